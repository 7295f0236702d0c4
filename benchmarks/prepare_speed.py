#!/usr/bin/env python
"""How fast ``prepare`` labels keyframes, per step, and end to end (the README's throughput workload).

    python tools/make_synthetic.py --out /tmp/w10 --scenes 1 --keyframes 20 --sweeps-per-keyframe 10 --seed 1
    git worktree add /tmp/old <older commit>          # optional: the code to compare against
    OMP_NUM_THREADS=1 python benchmarks/prepare_speed.py --dataroot /tmp/w10 --old-root /tmp/old --workers 2

Prints, for this checkout ("new") and, with ``--old-root``, another checkout ("old"):
  * the per-step CPU seconds of one scene (devkit load, vertical poses, accumulation, then per keyframe:
    placing the points, the vote, ray traversal, ground fill, camera frustum, compression), each step timed in
    turn in one single-threaded process (CPU time: steady on a shared machine);
  * ``tools/prepare_data.py --workers 1`` end to end: wall seconds, CPU seconds (user + sys of the run) and
    keyframes per second per core (keyframes / CPU seconds: on a shared machine CPU time is the steadier
    figure; on an idle one it equals keyframes / wall), and whether old and new labels are voxel-identical;
  * ``--workers N`` end to end on the same scene (within-scene parallelism) and the ``--dry-run`` estimate
    for 1 and N workers against the measured wall time.
Each tree runs in its own subprocess with ``PYTHONPATH`` set to it. Timings are noisy on a shared machine:
compare the ratios of one run (``--repeat`` takes the median of several).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
STEPS = ["place", "vote", "rays", "fill", "camera", "compress"]


def _steps(dataroot: str, version: str) -> dict:
    """In this process (whatever tree PYTHONPATH names): time each step of one scene's labels."""
    import io

    import numpy as np

    from occ_mfd.data.nuscenes import NuScenesSource
    from occ_mfd.data.occupancy import generate as gen
    from occ_mfd.data.occupancy.accumulate import accumulate_scene
    from occ_mfd.data.occupancy.camera import frustum_mask
    from occ_mfd.data.occupancy.points import majority_vote
    from occ_mfd.data.occupancy.vertical import level_scene
    from occ_mfd.data.prepare import PrepareConfig

    out = {}
    t0 = time.process_time()
    src = NuScenesSource(dataroot, version)
    out["load"] = time.process_time() - t0
    cfg = PrepareConfig()
    fcfg = cfg.frame_cfg()
    scene = src.scene(src.scene_names()[0])
    t0 = time.process_time()
    scene, boxes_of, _ = level_scene(scene, lambda sw, kf: src.boxes(sw.token), cfg.vertical_cfg())
    out["vertical"] = time.process_time() - t0
    t0 = time.process_time()
    cloud = accumulate_scene(scene, boxes_of, cfg.acc_cfg())
    out["accumulate"] = time.process_time() - t0
    rays = getattr(gen, "ray_masks", None) or gen.ray_voxels     # older trees: ray_voxels only
    per = {s: 0.0 for s in STEPS}
    for k, kf in enumerate(scene.keyframes):
        t = [time.process_time()]
        pts, labs, wts = gen.occupied_points(cloud, kf, k, fcfg)
        t.append(time.process_time())
        vox, cls = majority_vote(pts, labs, fcfg.grid, wts)
        t.append(time.process_time())
        rays(cloud, kf, k, fcfg)
        t.append(time.process_time())
        sem = np.full(fcfg.grid.num_voxels, 17, np.uint8)
        sem[vox] = cls
        sem = gen.fill_ground_holes(sem.reshape(fcfg.grid.shape), fcfg.fill_ground, fcfg.fill_min_neighbours)
        t.append(time.process_time())
        if kf.cameras:
            frustum_mask(fcfg.grid, kf.cameras, kf.ego2global)
        t.append(time.process_time())
        np.savez_compressed(io.BytesIO(), semantics=sem, mask_lidar=sem, mask_camera=sem)
        t.append(time.process_time())
        for s, a, b in zip(STEPS, t, t[1:]):
            per[s] += b - a
    out.update(per)
    out["keyframes"] = len(scene.keyframes)
    return out


def _run(root: Path, args: list[str]) -> tuple[float, float, str]:
    """Run ``args`` under ``root``'s code; (wall s, CPU s of the child and its workers, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise RuntimeError(f"{root}: {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, p.stdout


def _prepare(root: Path, dataroot: str, version: str, out: Path, workers: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    wall, cpu, _ = _run(root, ["tools/prepare_data.py", "--dataroot", dataroot, "--version", version,
                               "--out", str(out), "--workers", str(workers)])
    return wall, cpu


def _dry(root: Path, dataroot: str, version: str, workers: int) -> float:
    _, _, stdout = _run(root, ["tools/prepare_data.py", "--dataroot", dataroot, "--version", version,
                               "--dry-run", "--workers", str(workers)])
    return json.loads(stdout)["estimated_seconds"]


def _differing_voxels(a: Path, b: Path) -> int:
    """Voxels (semantics + both masks, all frames) that differ between two prepared folders."""
    sys.path.insert(0, str(HERE))
    from occ_mfd.data.occ3d import read_labels
    fa = sorted(p.relative_to(a) for p in a.rglob("labels.npz"))
    if fa != sorted(p.relative_to(b) for p in b.rglob("labels.npz")) or not fa:
        raise RuntimeError(f"{a} and {b} hold different sets of labels files")
    n = 0
    for f in fa:
        x, y = read_labels(a / f), read_labels(b / f)
        n += sum(int((getattr(x, k) != getattr(y, k)).sum()) for k in ("semantics", "mask_lidar", "mask_camera"))
    return n


def _med(xs):
    return statistics.median(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", required=True)
    p.add_argument("--version", default="v1.0-synth")
    p.add_argument("--old-root", help="a checkout of the code to compare against (e.g. a git worktree)")
    p.add_argument("--workers", type=int, default=2, help="also run with N workers (within-scene parallelism)")
    p.add_argument("--repeat", type=int, default=1, help="end-to-end runs per configuration (median)")
    p.add_argument("--json", help="write the numbers here too")
    p.add_argument("--_steps", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._steps:
        print(json.dumps(_steps(a.dataroot, a.version)))
        return 0
    trees = {"new": HERE} | ({"old": Path(a.old_root).resolve()} if a.old_root else {})
    me = str(Path(__file__).resolve())
    res: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="prepare_speed_"))
    try:
        for name, root in trees.items():
            _, _, so = _run(root, [me, "--_steps", "--dataroot", a.dataroot, "--version", a.version])
            r = res[name] = {"steps": json.loads(so)}
            runs = [_prepare(root, a.dataroot, a.version, tmp / name, 1) for _ in range(a.repeat)]
            r["wall_1"], r["cpu_1"] = _med([w for w, _ in runs]), _med([c for _, c in runs])
            r["dry_1"] = _dry(root, a.dataroot, a.version, 1)
            if a.workers > 1:
                runs = [_prepare(root, a.dataroot, a.version, tmp / f"{name}-w", a.workers) for _ in range(a.repeat)]
                r["wall_w"], r["cpu_w"] = _med([w for w, _ in runs]), _med([c for _, c in runs])
                r["dry_w"] = _dry(root, a.dataroot, a.version, a.workers)
                r["differing_voxels_w_vs_1"] = _differing_voxels(tmp / name, tmp / f"{name}-w")
        if "old" in res:
            res["differing_voxels_old_vs_new"] = _differing_voxels(tmp / "old", tmp / "new")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(res, a.workers)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


def _print_table(res: dict, workers: int) -> None:
    names = [n for n in ("old", "new") if n in res]
    nkf = res["new"]["steps"]["keyframes"]
    print(f"\nper step, one scene of {nkf} keyframes (seconds; per keyframe in brackets)")
    print(f"{'step':<12}" + "".join(f"{n:>18}" for n in names))
    for s in ["load", "vertical", "accumulate", *STEPS]:
        print(f"{s:<12}" + "".join(f"{res[n]['steps'][s]:>9.2f} ({res[n]['steps'][s] / nkf:5.2f})" for n in names))
    print(f"\nend to end, tools/prepare_data.py ({nkf} keyframes)")
    rows = [("wall s, 1 worker", lambda r: f"{r['wall_1']:.1f}"),
            ("CPU s, 1 worker", lambda r: f"{r['cpu_1']:.1f}"),
            ("keyframes/s/core", lambda r: f"{nkf / r['cpu_1']:.2f}"),
            ("dry-run estimate s, 1 worker", lambda r: f"{r['dry_1']:.1f} ({100 * (r['dry_1'] / r['wall_1'] - 1):+.0f} %)")]
    if workers > 1:
        rows += [(f"wall s, {workers} workers", lambda r: f"{r['wall_w']:.1f}"),
                 (f"speed-up, {workers} workers", lambda r: f"{r['wall_1'] / r['wall_w']:.2f}×"),
                 (f"dry-run estimate s, {workers} workers",
                  lambda r: f"{r['dry_w']:.1f} ({100 * (r['dry_w'] / r['wall_w'] - 1):+.0f} %)"),
                 (f"differing voxels, {workers} vs 1 worker", lambda r: str(r["differing_voxels_w_vs_1"]))]
    print(f"{'':<36}" + "".join(f"{n:>16}" for n in names))
    for label, f in rows:
        print(f"{label:<36}" + "".join(f"{f(res[n]):>16}" for n in names))
    if "differing_voxels_old_vs_new" in res:
        print(f"\nold vs new labels: {res['differing_voxels_old_vs_new']} differing voxels")


if __name__ == "__main__":
    sys.exit(main())
