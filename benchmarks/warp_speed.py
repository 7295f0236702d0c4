"""Time :func:`occ_mfd.ego_motion.warp_frame` against the earlier per-frame loop it replaced (same labels, bit for
bit: checked here on every run's output, and in tests/test_ego_motion.py).

    OMP_NUM_THREADS=1 python benchmarks/warp_speed.py                      # 100×100×8 at 0.8 m, B=1, F=6, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/warp_speed.py --voxel 0.4 --batch 4 --runs 50

Frame: random labels, 60 % free. Poses, one row each:

* ``planar``: constant speed and yaw rate (8 m/s, 0.1 rad per 0.5 s frame), the poses ``cv-warp`` and the
  forecaster's ``cv-warp`` prior warp by (:func:`occ_mfd.ego_motion.extrapolate_poses`: yaw only);
* ``3d``: the same with 1° of pitch and roll, like raw nuScenes ego poses (``warp-last``): every coordinate
  depends on all three axes, so no plane of the grid can be computed once.

Prints JSON: median / p10 / p90 ms per call for ``old`` and ``new`` (interleaved run by run, so a drifting load
on a shared machine hits both alike) and ``speedup`` = old median / new median.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from occ_mfd.ego_motion import planar_pose, warp_frame
from occ_mfd.grid import FREE_ID, OCC3D_GRID, GridSpec


def warp_frame_loop(frame, poses, grid, free_id=FREE_ID):
    """The earlier ``warp_frame`` (copied): numpy centres on every call, one ``centers @ R.T + t`` per (b, f)."""
    B = frame.shape[0]
    X, Y, Z = grid.shape
    n_future = poses.shape[1]
    dev = frame.device
    centers = torch.from_numpy(grid.centers()).to(dev, torch.float64).reshape(-1, 3)       # (N, 3)
    lo = torch.tensor(grid.lo, dtype=torch.float64, device=dev)
    dims = torch.tensor([X, Y, Z], device=dev)
    src = frame.reshape(B, -1)                                                             # (B, N)
    out = torch.full((B, n_future, X * Y * Z), free_id, dtype=frame.dtype, device=dev)
    T = poses.to(device=dev, dtype=torch.float64)                                          # (B, F, 4, 4)
    for b in range(B):
        for k in range(n_future):
            q = centers @ T[b, k, :3, :3].T + T[b, k, :3, 3]                               # (N, 3)
            idx = torch.floor((q - lo) / grid.voxel_size).long()
            inside = ((idx >= 0) & (idx < dims)).all(dim=1)
            flat = (idx[:, 0] * Y + idx[:, 1]) * Z + idx[:, 2]
            out[b, k, inside] = src[b, flat[inside]]
    return out.view(B, n_future, X, Y, Z)


def poses(batch: int, frames: int, tilt_deg: float) -> torch.Tensor:
    """(B, F, 4, 4): an arc at 4 m and 0.1 rad per frame, tilted by ``tilt_deg`` of pitch and roll."""
    k = torch.arange(1, frames + 1, dtype=torch.float64)
    yaw, R = 0.1 * k, 4.0 / 0.1
    p = planar_pose(torch.stack([R * torch.sin(yaw), R * (1 - torch.cos(yaw)), yaw], -1))
    if tilt_deg:
        a = math.radians(tilt_deg)
        c, s = math.cos(a), math.sin(a)
        pitch = torch.tensor([[c, 0, s, 0], [0, 1, 0, 0], [-s, 0, c, 0], [0, 0, 0, 1]], dtype=torch.float64)
        roll = torch.tensor([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1]], dtype=torch.float64)
        p = p @ pitch @ roll
    return p.expand(batch, -1, -1, -1).contiguous().float()                          # float32, like OccBatch.ego


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*args)
    return 1e3 * (time.perf_counter() - t0), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voxel", type=float, default=0.8, help="voxel size on the Occ3D range (0.8: 100×100×8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.runs < 20:
        ap.error("--runs: at least 20 (the median of fewer is too noisy on a shared machine)")
    torch.set_num_threads(args.threads)
    grid = GridSpec(OCC3D_GRID.lo, OCC3D_GRID.hi, args.voxel)
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, FREE_ID, (args.batch, *grid.shape), generator=g, dtype=torch.uint8)
    frame[torch.rand(frame.shape, generator=g) < 0.6] = FREE_ID
    out = {"grid": list(grid.shape), "voxel_size": args.voxel, "batch": args.batch, "frames": args.frames,
           "threads": torch.get_num_threads(), "runs": args.runs, "ms": {}}
    for name, tilt in (("planar", 0.0), ("3d", 1.0)):
        p = poses(args.batch, args.frames, tilt)
        times = {"old": [], "new": []}
        for i in range(-args.warmup, args.runs):
            ms_old, old = timed(warp_frame_loop, frame, p, grid)
            ms_new, new = timed(warp_frame, frame, p, grid)
            if not torch.equal(old, new):
                raise SystemExit(f"{name}: warp_frame differs from the loop version")
            if i >= 0:
                times["old"].append(ms_old)
                times["new"].append(ms_new)
        row = {k: {"median": round(float(np.median(t)), 2), "p10": round(float(np.percentile(t, 10)), 2),
                   "p90": round(float(np.percentile(t, 90)), 2)} for k, t in times.items()}
        row["speedup"] = round(row["old"]["median"] / row["new"]["median"], 1)
        out["ms"][name] = row
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
