#!/usr/bin/env python
"""Cost of the released OccFM at full size on this machine: import, and one VAE frame / one flow-net call.

    python benchmarks/occfm_import.py [--threads 1] [--repeats 3] [--out occfm_import.json]

Reports our modules' largest error against the committed goldens (outputs of the upstream code at reduced width).
Builds a fake upstream world-model checkpoint with the release's keys and shapes
(``tests/goldens/occfm_state_dict_keys.tsv``; random values, an EMA copy, optimiser state) in a temp folder, imports
it with ``tools/import_occfm.py`` in a child process (wall time and the child's peak resident memory), then times,
with random weights, one full-size VAE encode + decode of a 200 × 200 × 16 frame and one flow-net call (B = 1,
12 frames of 16 × 50 × 50) at ``--threads`` threads, fp32, median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "tests/goldens/occfm_state_dict_keys.tsv"


def fake_checkpoint(path: Path) -> int:
    """Write an upstream-format world-model checkpoint of the manifest's shapes; returns its float element count (parameters and float buffers, one copy)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for line in MANIFEST.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")[:3]
        shape = tuple(int(n) for n in shape.split("x")) if shape else ()
        state[key] = (torch.randn(shape, generator=g) if dtype == "float32"
                      else torch.randint(0, 81, shape, generator=g))
    ema = {"n_averaged": torch.tensor(1000), **{"module." + k: v.clone() for k, v in state.items()}}  # own storage
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "ema_model": ema, "epoch": 199,
                "optimizer_states": [{"state": {}, "param_groups": []}], "scaler_state_dict": None,
                "lr_scheduler": {}}, path)
    return sum(v.numel() for v in state.values() if v.is_floating_point())


def full_yaml(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from test_occfm_official_import import full_yaml as write
    return write(root, 6)


def golden_errors() -> dict:
    """Max |ours − upstream| per output on the committed goldens (reduced width, key-derived weights)."""
    from occ_mfd.models.occfm_official.key_init import fill_from_keys
    from occ_mfd.models.occfm_official.unet import OccFmFlowNet
    from occ_mfd.models.occfm_official.upstream_config import load_upstream_yaml
    from occ_mfd.models.occfm_official.vae import OccFmVAE
    from occ_mfd.models.occfm_official.verify import load_reference, verify_reference

    g = REPO / "tests/goldens"
    vae = fill_from_keys(OccFmVAE.from_upstream_config(load_upstream_yaml(g / "occfm_vae_reduced.yaml")))
    out = {"vae": verify_reference(load_reference(g / "occfm_vae_golden.npz"), vae=vae)}
    for variant in ("hist", "fut"):
        net = fill_from_keys(OccFmFlowNet.from_upstream_config(load_upstream_yaml(g / f"occfm_flow_{variant}_reduced.yaml")))
        out[f"flow_{variant}"] = verify_reference(load_reference(g / f"occfm_flow_{variant}_golden.npz"), flow_net=net)
    return {k: {n: float(f"{e:.2e}") for n, e in v.items()} for k, v in out.items()}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the figures as JSON")
    args = p.parse_args(argv)
    res: dict = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__}
    torch.set_num_threads(args.threads)
    res["golden_max_abs_err"] = golden_errors()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        res["fake_checkpoint_float_elements"] = fake_checkpoint(d / "wm.ckpt")
        res["fake_checkpoint_mb"] = round((d / "wm.ckpt").stat().st_size / 2**20, 1)
        yml = full_yaml(d)
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(REPO / "tools/import_occfm.py"), "--ckpt", str(d / "wm.ckpt"),
                            "--config", str(yml), "--out", str(d / "out")], capture_output=True, text=True)
        res["import_s"] = round(time.perf_counter() - t0, 2)
        if r.returncode != 0:
            raise SystemExit(f"import failed:\n{r.stderr}")
        res["import_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        res["teacher_pt_mb"] = round((d / "out/teacher.pt").stat().st_size / 2**20, 1)

        from occ_mfd.models.snapshot import load_snapshot
        snap = load_snapshot(d / "out/teacher.pt")
        vae, net = snap.build("vae"), snap.build("net")
    torch.set_num_threads(args.threads)
    occ = torch.randint(0, 18, (1, 200, 200, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        res["vae_frame_s"] = round(median_time(lambda: vae.decode(vae.encode(occ).mean), args.repeats), 2)
        x = torch.randn(1, 12, 16, 50, 50)
        t, traj = torch.full((1,), 500.0), torch.randn(1, 6, 2)
        res["flow_call_s"] = round(median_time(lambda: net.net(x, t, traj), args.repeats), 2)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
