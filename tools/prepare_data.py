#!/usr/bin/env python
"""Prepare semantic occupancy labels (Occ3D layout) from a nuScenes dataroot, resumably.

    python tools/prepare_data.py --dataroot D --version V --out O [--scenes NAME ...] [--workers W]
        [--window N] [--ray-window N] [--shard K/N] [--dry-run] [--skip-bad] [--grid occ3d|occ3d-0.8]
        [--vertical auto|on|off] [--z-convention lidar|occ3d]
    python tools/prepare_data.py --source occ3d --occ3d-root R --dataroot D --version V [--out O]
    python tools/prepare_data.py verify O
    python tools/prepare_data.py quality O --truth DIR/truth [--allow-convention-mismatch]
    python tools/prepare_data.py convention DIR [--max-frames N] [--json]

--vertical: nuScenes poses have no z, pitch or roll; "auto" (default) recovers them by registering each sweep's
ground to the scene's ground map where the scene is not level (occ_mfd/data/occupancy/vertical.py), "on"
always, "off" never. --z-convention: "lidar" (default: the road at the ego ground, z-index 2) or "occ3d"
(Occ3D's released labels: the road at z-index 0, objects filled down to it); recorded in index.json.
"convention DIR" estimates the vertical convention of any labels folder (an index, or any **/labels.npz).

Kill it at any time and run the same command again: finished frames are skipped.
--shard K/N (K = 0..N-1) takes every N-th scene of the sorted list; each shard writes
index.shard-K-of-N.json and the last one to finish merges them into index.json.
"""
from __future__ import annotations

import time

_STARTED = time.perf_counter()      # before the heavy imports: --dry-run counts them (a real run pays them too)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from occ_mfd.data.prepare import GRID_PRESETS, PrepareConfig, dry_run, run_prepare


def _verify(argv) -> int:
    from occ_mfd.data.occ3d_import import verify_dataset
    p = argparse.ArgumentParser(prog="prepare_data.py verify")
    p.add_argument("out")
    a = p.parse_args(argv)
    rep = verify_dataset(a.out, progress=True)
    print(rep.summary())
    return 0 if rep.ok else 1


def _quality(argv) -> int:
    from occ_mfd.data.nuscenes import NuScenesSource
    from occ_mfd.data.index import load_index
    from occ_mfd.data.occupancy.quality import compare_to_truth
    p = argparse.ArgumentParser(prog="prepare_data.py quality")
    p.add_argument("out")
    p.add_argument("--truth", required=True, help="folder holding the exact labels' gts/")
    p.add_argument("--allow-convention-mismatch", action="store_true",
                   help="compare even when the two folders declare different vertical conventions")
    a = p.parse_args(argv)
    src_d = load_index(a.out).source
    src = NuScenesSource(src_d["dataroot"], src_d["version"])
    boxes = {kf.token: kf.boxes for n in src.scene_names() for kf in src.scene(n).keyframes}
    print(compare_to_truth(a.out, a.truth, boxes, allow_convention_mismatch=a.allow_convention_mismatch).summary())
    return 0


def _convention(argv) -> int:
    from occ_mfd.data.convention import UNKNOWN, estimate_folder
    p = argparse.ArgumentParser(prog="prepare_data.py convention",
                                description="Estimate the vertical convention (lidar / occ3d) of a labels folder.")
    p.add_argument("dir", help="a prepared folder (index.json + gts/), or any folder holding **/labels.npz")
    p.add_argument("--max-frames", type=int, help="read at most N labels files")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    a = p.parse_args(argv)
    est, declared = estimate_folder(a.dir, a.max_frames)
    if a.json:
        print(json.dumps({**est.to_dict(), "declared": declared}, indent=1))
    else:
        print(est.summary())
        print(f"  declared by its index.json: {declared or 'nothing'}")
        if declared and est.convention != UNKNOWN and declared != est.convention:
            print(f"  warning: the index says {declared!r} but the labels look {est.convention!r}")
    return 0


def _occ3d(a) -> int:
    from occ_mfd.data.index import save_index
    from occ_mfd.data.nuscenes import NuScenesSource
    from occ_mfd.data.occ3d_import import build_occ3d_index
    src = NuScenesSource(a.dataroot, a.version)
    names = a.scenes or src.scene_names()
    frames = {n: [(kf.token, kf.timestamp, kf.ego2global, kf.lidar.sensor2ego) for kf in src.scene(n).keyframes]
              for n in names}
    idx, rep = build_occ3d_index(a.occ3d_root, frames, {n: src.splits.get(n, "unknown") for n in names},
                                 {"dataroot": a.dataroot, "version": a.version})
    out = Path(a.out or a.occ3d_root)
    save_index(out, idx)
    # Loaders expect gts/ beside index.json: link the downloaded labels in (nothing is copied).
    if out.resolve() != Path(a.occ3d_root).resolve() and not (out / "gts").exists():
        (out / "gts").symlink_to(Path(a.occ3d_root).resolve() / "gts", target_is_directory=True)
    print(rep.summary())
    return 0 if rep.ok else 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            return _verify(argv[1:])
        if argv[:1] == ["quality"]:
            return _quality(argv[1:])
        if argv[:1] == ["convention"]:
            return _convention(argv[1:])
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", required=True)
    p.add_argument("--version", default="v1.0-trainval")
    p.add_argument("--out")
    p.add_argument("--scenes", nargs="*")
    p.add_argument("--workers", type=int)
    p.add_argument("--window", type=int, default=None, help="static points from ±N keyframes (default: whole scene)")
    p.add_argument("--ray-window", type=int, default=0, help="rays from sweeps of ±N keyframes (default 0)")
    p.add_argument("--keyframes-only", action="store_true", help="ignore non-key sweeps")
    p.add_argument("--shard", help="K/N")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--grid", choices=sorted(GRID_PRESETS), default="occ3d")
    p.add_argument("--voxel-size", type=float, help="override the preset's voxel size (same range)")
    p.add_argument("--source", choices=["nuscenes", "occ3d"], default="nuscenes")
    p.add_argument("--occ3d-root")
    p.add_argument("--vertical", choices=["auto", "on", "off"], default="auto",
                   help="recover the missing z/pitch/roll of the ego poses by ground registration (default: auto)")
    p.add_argument("--z-convention", choices=["lidar", "occ3d"], default="lidar",
                   help="vertical convention of the labels written (default: lidar, faithful to the sensor)")
    a = p.parse_args(argv)
    if a.source == "occ3d":
        if not a.occ3d_root:
            p.error("--source occ3d needs --occ3d-root")
        try:
            return _occ3d(a)
        except (FileNotFoundError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    grid = GRID_PRESETS[a.grid]
    if a.voxel_size:
        from occ_mfd.grid import GridSpec
        grid = GridSpec(grid.lo, grid.hi, a.voxel_size)
    cfg = PrepareConfig(grid=grid, window=a.window, ray_window=a.ray_window, use_sweeps=not a.keyframes_only,
                        vertical=a.vertical, z_convention=a.z_convention)
    shard = tuple(int(v) for v in a.shard.split("/")) if a.shard else None
    try:
        if a.dry_run:
            est = dry_run(a.dataroot, a.version, cfg, a.scenes, a.workers, shard,
                          startup_seconds=time.perf_counter() - _STARTED)
            print(json.dumps(est, indent=1))
            return 0
        if not a.out:
            p.error("--out is required")
        res = run_prepare(a.dataroot, a.version, a.out, cfg, a.scenes, a.workers, shard, a.skip_bad)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepare: {res['scenes']} scenes, {res['written']} frames written, {res['skipped']} already done, "
          f"{res['bad']} bad inputs skipped")
    for name, v in res.get("vertical", {}).items():
        print(f"  {name}: vertical poses {'recovered' if v['applied'] else 'level, written poses kept'} "
              f"(the written poses misplace sweeps by up to {v['smear_m']} m vertically; max |dz| {v['max_dz_m']} m, "
              f"max tilt {v['max_tilt_deg']}°; {v['failed']} of {v['sweeps']} sweeps not registered)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
