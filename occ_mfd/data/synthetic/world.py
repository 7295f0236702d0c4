"""Make a whole synthetic world: simulate N scenes and write them as one nuScenes dataroot, atomically.

``make_world`` validates everything first, simulates the scenes (optionally in worker processes),
streams them into a temporary sibling folder of ``out`` and renames it to ``out`` only when all is
written, so a crash or Ctrl-C never leaves a half world that looks complete.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from occ_mfd.data.synthetic.nuscenes_truth import TruthWriter
from occ_mfd.data.synthetic.nuscenes_writer import write_scenes
from occ_mfd.data.synthetic.scene import SimScene
from occ_mfd.data.synthetic.simulate import simulate_scene
from occ_mfd.data.synthetic.terrain import FLAT, TERRAINS
from occ_mfd.grid import OCC3D_GRID, GridSpec

MIN_KEYFRAMES = 10  # the pipeline needs 4 past + 6 future keyframes in one scene


@dataclass
class WorldSummary:
    """What ``make_world`` wrote and how fast (``sweeps_per_s`` = all LiDAR spins / wall seconds)."""

    out: Path
    version: str
    scenes: int
    samples: int
    sweeps: int
    seconds: float
    sweeps_per_s: float
    splits: dict

    def line(self) -> str:
        return (f"wrote {self.scenes} scenes, {self.samples} keyframes, {self.sweeps} sweeps to {self.out} "
                f"({self.version}) in {self.seconds:.1f} s: {self.sweeps_per_s:.1f} sweeps/s; "
                f"train {len(self.splits['train'])} / val {len(self.splits['val'])} scenes")


def scene_seed(seed: int, name: str) -> int:
    """A scene's simulator seed, derived stably from the world seed and the scene name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def split_scenes(names: list[str], seed: int, val_fraction: float) -> dict[str, str]:
    """Deterministic train/val split: round(N·val_fraction) val scenes, at least one when N ≥ 2."""
    n = len(names)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    val = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return {name: ("val" if i in val else "train") for i, name in enumerate(names)}


def _simulate(job: tuple) -> SimScene:
    name, kw = job
    return simulate_scene(name, **kw)


def _check(out: Path, version: str, scenes: int, keyframes: int, sweeps_per_keyframe: int,
           val_fraction: float, workers: int) -> None:
    if isinstance(scenes, bool) or not isinstance(scenes, int) or scenes < 1:
        raise ValueError(f"make_world: scenes must be an integer ≥ 1, got {scenes!r}")
    if not isinstance(keyframes, int) or keyframes < MIN_KEYFRAMES:
        raise ValueError(f"make_world: keyframes must be an integer ≥ {MIN_KEYFRAMES} (the pipeline needs "
                         f"4 past + 6 future keyframes per scene), got {keyframes!r}")
    if not isinstance(sweeps_per_keyframe, int) or sweeps_per_keyframe < 1:
        raise ValueError(f"make_world: sweeps_per_keyframe must be an integer ≥ 1, got {sweeps_per_keyframe!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"make_world: val_fraction must lie in [0, 1), got {val_fraction!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"make_world: workers must be an integer ≥ 1, got {workers!r}")
    if not version or "/" in version or "\\" in version:
        raise ValueError(f"make_world: bad version folder name {version!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"make_world: {out} already exists and is not an empty folder; "
                              "refusing to overwrite it (remove it or choose another --out)")


def make_world(out: Path | str, version: str = "v1.0-synth", scenes: int = 8, keyframes: int = 40,
               sweeps_per_keyframe: int = 2, seed: int = 0, truth: bool = False, val_fraction: float = 0.25,
               workers: int = 1, progress: bool = True, grid: GridSpec = OCC3D_GRID,
               simulate=None, terrain: str = FLAT) -> WorldSummary:
    """Simulate ``scenes`` scenes (``scene-0001`` …) and write them to ``out`` as a nuScenes dataroot.

    Args:
        out: the dataroot to create (must not exist, or be an empty folder).
        version: nuScenes version folder name.
        scenes, keyframes, sweeps_per_keyframe: world size; ``keyframes`` ≥ 10 per scene.
        seed: world seed; scene seeds and the split derive from it; same seed → byte-identical world.
        truth: also write the exact occupancy under ``out/truth/`` (see ``nuscenes_truth``).
        val_fraction: share of val scenes (at least one when scenes ≥ 2).
        workers: simulate scenes in this many processes (1: in this process).
        simulate: ``f(name, **kw) -> SimScene`` replacing ``simulate.simulate_scene`` (tests; must be
            picklable when workers > 1).
        terrain: "flat" (the plane z = 0, the default) or "hills" (slopes up to 8 %; the written ego poses
            keep only x, y and yaw, like nuScenes'; see ``simulate`` and ``terrain``).
    """
    out = Path(out).absolute()
    if terrain not in TERRAINS:
        raise ValueError(f"make_world: terrain must be one of {TERRAINS}, got {terrain!r}")
    _check(out, version, scenes, keyframes, sweeps_per_keyframe, val_fraction, workers)
    names = [f"scene-{i:04d}" for i in range(1, scenes + 1)]
    split = split_scenes(names, seed, val_fraction)
    jobs = [(n, dict(seed=scene_seed(seed, n), num_keyframes=keyframes, sweeps_per_keyframe=sweeps_per_keyframe,
                     split=split[n], with_truth=truth, grid=grid, **({} if terrain == FLAT else {"terrain": terrain})))
            for n in names]
    fn = _simulate if simulate is None else _Call(simulate)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.perf_counter()
    pool = None
    try:
        if workers > 1:
            pool = mp.get_context("spawn").Pool(min(workers, scenes))
            stream = pool.imap(fn, jobs)  # ordered: tables list scenes in name order
        else:
            stream = map(fn, jobs)
        bar = tqdm(stream, total=scenes, desc="synthetic scenes", unit="scene", disable=not progress)
        truth_writer = (TruthWriter(tmp / "truth", version=version, dataroot=str(out), grid=grid)
                        if truth else None)
        info = write_scenes(bar, tmp, version, salt=f"seed={seed}", on_scene=truth_writer)
        if truth_writer is not None:
            truth_writer.finish()
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace it on every OS
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - t0
    return WorldSummary(out=out, version=version, scenes=info["scenes"], samples=info["samples"],
                        sweeps=info["sweeps"], seconds=seconds, sweeps_per_s=info["sweeps"] / max(seconds, 1e-9),
                        splits=info["splits"])


class _Call:
    """Picklable ``job → simulate(name, **kw)`` for worker processes."""

    def __init__(self, simulate):
        self.simulate = simulate

    def __call__(self, job):
        return self.simulate(job[0], **job[1])
