"""Time one VAE training step (objective forward + backward + AdamW) of a config with and without the 3-D stem,
and with the stem through spconv or its dense twin, on the same occupancy: is the spconv stem worth it here?

    OMP_NUM_THREADS=1 python benchmarks/sparse_stem.py --config configs/tiny/vae.py --stem3d-channels 8 --threads 1
    python benchmarks/sparse_stem.py --config configs/nuscenes/vae.py --device cuda

Occupancy: the real Occ3D frame beside the checkout (../shared/nuscenes_real, 6 % occupied at 0.4 m), pooled to
the config's grid, else a synthetic frame (ground + boxes); repeated over the config's frames per step. Rows:
``no-stem`` (the config without the stem), ``stem-spconv``, ``stem-dense`` (same parameters, same function).
Prints JSON: median / p10 / p90 ms per step (variants interleaved run by run) and the occupied fraction.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config

from occ_mfd.builder import build
from occ_mfd.data.pool import pool_semantics
from occ_mfd.data.records import OccBatch
from occ_mfd.grid import FREE_ID
from occ_mfd.models.sparse import spconv_status

REAL = Path(__file__).resolve().parents[2] / "shared/nuscenes_real/CVPR2023-3D-Occupancy-Prediction/data"


def frame(grid_xy: int, grid_z: int) -> tuple[np.ndarray, str]:
    files = sorted(REAL.glob("*/labels.npz")) if REAL.is_dir() else []
    if files:
        sem = np.load(files[0])["semantics"]
        factor = sem.shape[0] // grid_xy
        if factor >= 1 and sem.shape[0] == factor * grid_xy and sem.shape[2] == factor * grid_z:
            return (pool_semantics(sem, factor) if factor > 1 else sem), f"{files[0].parent.name} pooled {factor}x"
    g = np.random.default_rng(0)
    sem = np.full((grid_xy, grid_xy, grid_z), FREE_ID, np.uint8)
    sem[:, :, 0] = 11
    for _ in range(grid_xy * grid_xy // 200):
        x, y = g.integers(0, grid_xy - 4, 2)
        sem[x:x + 4, y:y + 4, 1:max(2, grid_z // 3)] = g.integers(0, 17)
    return sem, "synthetic"


def step(objective, opt, batch, device) -> float:
    """ms of one optimiser step (device synchronised around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    objective(batch).loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny/vae.py")
    ap.add_argument("--stem3d-channels", type=int, help="default: the config's, else 8")
    ap.add_argument("--frames", type=int, help="frames per step (default: the config's max_frames, else 10)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = Config.fromfile(args.config)
    obj_cfg = cfg.objective.to_dict()
    vae = obj_cfg["vae"]
    grid_z, stem = int(vae["grid_z"]), args.stem3d_channels or int(vae.get("stem3d_channels") or 8)
    grid_xy = 200 // int(cfg.data.get("pool", 1))
    sem, source = frame(grid_xy, grid_z)
    frames = args.frames or int(obj_cfg.get("max_frames") or 10)
    occ = torch.from_numpy(sem).long()[None, None].repeat(1, frames, 1, 1, 1)      # (1, T, X, Y, Z)
    obj_cfg["max_frames"] = None
    batch = OccBatch(past=occ[:, :1], future=occ[:, 1:], ego=torch.eye(4).repeat(1, frames, 1, 1)).to(device)
    status = spconv_status()
    variants = {"no-stem": dict(stem3d_channels=0, sparse=False),
                "stem-dense": dict(stem3d_channels=stem, sparse=False)}
    if status.usable:
        variants["stem-spconv"] = dict(stem3d_channels=stem, sparse=True)
    out = {"config": args.config, "device": str(device), "threads": torch.get_num_threads(), "frames": frames,
           "grid": list(sem.shape), "occupancy": source, "occupied_fraction": round(float((sem != FREE_ID).mean()), 4),
           "stem3d_channels": stem, "spconv": f"{status.dists} {status.version}" if status.usable else status.problem,
           "step_ms": {}}
    built = {}
    for name, over in variants.items():
        c = copy.deepcopy(obj_cfg)
        c["vae"].update(over)
        torch.manual_seed(0)
        objective = build(c).to(device)
        built[name] = (objective, torch.optim.AdamW(objective.parameters(), lr=1e-6))
    # Interleaved (one step of each variant per round), so drifting load on a shared machine hits all alike.
    times = {name: [] for name in built}
    for i in range(-args.warmup, args.runs):
        for name, (objective, opt) in built.items():
            ms = step(objective, opt, batch, device)
            if i >= 0:
                times[name].append(ms)
    out["step_ms"] = {name: {"median": round(float(np.median(t)), 1), "p10": round(float(np.percentile(t, 10)), 1),
                             "p90": round(float(np.percentile(t, 90)), 1)} for name, t in times.items()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
