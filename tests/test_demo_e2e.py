"""End to end: the demo pipeline at its smallest size (`tools/demo.py --size smoke`), as a user runs it.

Checks the products and the README's claims a smoke-sized run can afford (it trains for a few steps, so not
the quality of the models): the table has every row and horizon with finite numbers and true summaries; every
stage leaves a checkpoint and an inference snapshot, and the table's models are those snapshots; warp-last
(true future ego poses) beats copy-last on IoU at every horizon (the synthetic ego drives at 8-14 m/s); ten
network evaluations take longer than one; the GIF has one frame per time step; a second run reuses every
finished stage.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
HORIZONS = ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]


@pytest.mark.slow
def test_demo_smoke(tmp_path):
    w = tmp_path / "demo"
    cmd = [sys.executable, "tools/demo.py", "--size", "smoke", "--work-dir", str(w)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    results = json.loads((w / "results.json").read_text())
    rows = {(r["name"], r["steps"]): r for r in results["rows"]}
    assert set(rows) >= {("teacher", 10), ("teacher", 1), ("student", 1), ("copy-last", 0), ("cv-warp", 0), ("warp-last", 0)}
    for r in rows.values():
        assert list(r["iou"]) == HORIZONS and list(r["miou"]) == HORIZONS
        vals = [*r["iou"].values(), *r["miou"].values(), r["iou_mean_123"], r["iou_mean_all"]]
        assert all(v is not None and math.isfinite(v) and 0 <= v <= 100 for v in vals), r["name"]
        # The summaries are what they say: the mean of 1/2/3 s and of all six horizons.
        assert r["iou_mean_123"] == pytest.approx(np.mean([r["iou"][h] for h in ("1.0", "2.0", "3.0")]))
        assert r["iou_mean_all"] == pytest.approx(np.mean([r["iou"][h] for h in HORIZONS]))
    assert rows[("student", 1)]["nfe"] == 1 and rows[("teacher", 10)]["nfe"] == 10
    assert results["protocol"]["split"] == "val"
    assert ("vae-recon", 0) in rows
    warp, copy = rows[("warp-last", 0)], rows[("copy-last", 0)]
    assert all(warp["iou"][h] > copy["iou"][h] for h in HORIZONS), (warp["iou"], copy["iou"])
    for stage in ("vae", "teacher", "mfd"):
        assert (w / stage / "latest.pt").is_file() and (w / stage / "snapshot.pt").is_file(), stage
    snapshots = {m["name"]: m["snapshot"] for m in results["protocol"]["models"]}
    assert Path(snapshots["student"]) == w / "mfd" / "snapshot.pt"
    assert {Path(snapshots[n]) for n in snapshots if n.startswith("teacher")} == {w / "teacher" / "snapshot.pt"}

    bench = json.loads((w / "bench.json").read_text())
    names = {r["name"]: r for r in bench["rows"]}
    assert {"teacher@10", "teacher@1", "student@1"} <= set(names)
    assert names["student@1"]["nfe"] == 1 and names["teacher@10"]["steps"] == 10
    assert all(r["latency_ms_median"] > 0 for r in bench["rows"])
    # 10 guided steps (20 network evaluations of batch 1) take longer than 1 guided step
    assert names["teacher@10"]["stages_ms"]["sample"] > 2 * names["teacher@1"]["stages_ms"]["sample"]

    import imageio.v3 as iio
    frames = iio.imread(w / "forecast.gif", index=None)
    assert frames.ndim == 4 and frames.shape[0] == 4 + 6  # one frame per time step: 4 past + 6 future

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") >= 5 and "already finished" in again.stdout
