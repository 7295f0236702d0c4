"""Speed protocol: stage/end-to-end medians against known sleeps, call counts, ratio arithmetic, the timed
stages compute what the pipeline computes, and tools/bench.py's JSON shape."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from occ_mfd.eval.speed import SpeedRow, measure, pipeline_stages, speedups, time_stages

REPO = Path(__file__).resolve().parents[1]
SLEEPS_MS = {"encode": 4.0, "sample": 12.0, "decode": 6.0, "argmax": 2.0}


def sleeping_stages(calls):
    def stage(name):
        def fn(x):
            calls[name] = calls.get(name, 0) + 1
            time.sleep(SLEEPS_MS[name] / 1e3)
            return x + 1
        return name, fn
    return [stage(n) for n in SLEEPS_MS]


def test_stage_medians_match_sleeps_and_warmup_is_untimed():
    calls = {}
    e2e, per = time_stages(sleeping_stages(calls), 0, runs=15, warmup=3)
    assert calls == {n: 18 for n in SLEEPS_MS}                 # warm-up runs execute, but are not recorded
    assert e2e.shape == (15,) and all(v.shape == (15,) for v in per.values())
    for name, ms in SLEEPS_MS.items():
        med = float(np.median(per[name]))
        assert ms <= med < ms + 3.0, (name, med)               # sleep() never returns early; slack for load
    total = sum(SLEEPS_MS.values())
    assert total <= float(np.median(e2e)) < total + 6.0
    # End to end is the chain, so it is at least the sum of its own stages in every run.
    assert np.all(e2e + 1e-9 >= sum(per.values()))


def test_measure_fields_and_speedup_arithmetic():
    row = measure("fake@4", 4, 4, sleeping_stages({}), 0, runs=10, warmup=1, progress=False)
    assert row.fps == pytest.approx(1e3 / row.latency_ms_median)
    assert row.latency_ms_p90 >= row.latency_ms_median
    assert set(row.stages_ms) == set(SLEEPS_MS)
    mk = lambda name, ms: SpeedRow(name, 1, 1, ms, ms, 1e3 / ms, {})
    rows = [mk("teacher@10", 40.0), mk("student@1", 8.0), mk("teacher@1", 10.0)]
    assert speedups(rows, "teacher@10") == {"teacher@10": 1.0, "student@1": 5.0, "teacher@1": 4.0}
    with pytest.raises(ValueError, match="no row named"):
        speedups(rows, "teacher@20")


def _tiny_pipeline(cfg_scale=2.0):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_cli import tiny_teacher_config
    from occ_mfd.engine.builder import build
    from occ_mfd.models.world_model import OccForecastPipeline

    torch.manual_seed(0)
    obj = build(tiny_teacher_config().objective)
    with torch.no_grad():   # adaLN-Zero outputs start at 0: randomise so the net is not the zero field
        for p in obj.net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.3)
    return OccForecastPipeline(obj.prepare.codec, obj.net, steps=3, shift=3.0, cfg_scale=cfg_scale).eval()


@pytest.mark.parametrize("fused", [True, False])
def test_timed_stages_compute_the_pipeline_forecast(fused):
    from occ_mfd.data.records import OccBatch

    pipe = _tiny_pipeline()
    g = torch.Generator().manual_seed(1)
    occ = torch.where(torch.rand(1, 10, 10, 10, 2, generator=g) < 0.6, 17, torch.randint(0, 17, (1, 10, 10, 10, 2),
                                                                                      generator=g))
    ego = torch.eye(4).repeat(1, 10, 1, 1)
    ego[0, :, 0, 3] = torch.arange(10.0) - 3
    batch = OccBatch(past=occ[:, :4], future=occ[:, 4:], ego=ego)
    x = batch
    for _, fn in pipeline_stages(pipe, 3, seed=5, fused_cfg=fused):
        x = fn(x)
    ref = pipe.forecast(batch, steps=3, generator=torch.Generator().manual_seed(5))
    assert x.dtype == torch.uint8 and torch.equal(x, ref.classes)
    lat = pipeline_stages(pipe, 3, seed=5, fused_cfg=fused)
    y = lat[1][1](lat[0][1](batch))
    assert torch.allclose(y, ref.latents, atol=1e-5)          # two-pass CFG = fused CFG numerically


def test_bench_cli_json(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_eval_cli import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "t")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--teacher", ckpt, "--steps", "1", "2",
                        "--runs", "3", "--warmup", "1", "--train-runs", "2", "--train-warmup", "0", "--threads", "1",
                        "--out", out], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "below the protocol" in r.stderr
    d = json.loads(out.read_text())
    assert d["device"]["device"] == "cpu" and d["device"]["threads"] == 1 and d["device"]["dtype"] == "float32"
    assert [row["name"] for row in d["rows"]] == ["teacher@1", "teacher@2", "floor"]
    for row in d["rows"]:
        assert {"name", "steps", "nfe", "latency_ms_median", "latency_ms_p90", "fps", "stages_ms"} <= set(row)
    assert set(d["rows"][0]["stages_ms"]) == {"encode", "sample", "decode", "argmax"}
    assert d["speedup_reference"] == "teacher@2" and d["speedups"]["teacher@2"] == 1.0
    assert d["speedups"]["teacher@1"] == pytest.approx(d["rows"][1]["latency_ms_median"] /
                                                       d["rows"][0]["latency_ms_median"])
    assert "teacher_fm" in d["training_steps_ms"] and d["training_steps_ms"]["teacher_fm"]["ms_median"] > 0
