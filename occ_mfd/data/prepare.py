"""The ``prepare`` job: nuScenes dataroot → ``<out>/gts/<scene>/<token>/labels.npz`` + ``index.json``.

Parallel over scenes (one worker process accumulates a scene once and writes all its keyframes; see
:mod:`occ_mfd.data.worker_pool` for the workers and their threads) and, with fewer scenes than workers, within a
scene (the scene is accumulated once, then its keyframes are shared out to the workers), resumable
(a frame whose file exists and validates is skipped; writes are atomic, stale temp files are removed),
shardable (``shard=(k, n)``: scenes ``i`` with ``i % n == k`` of the sorted scene list; each shard writes
``index.shard-k-of-n.json``; when all ``n`` exist they are merged into ``index.json``).

Hills: nuScenes ego poses lack z, pitch and roll; before accumulating, each scene's vertical pose is
recovered by ground registration (``vertical``: "auto" applies it where the scene is not level, see
:mod:`occ_mfd.data.occupancy.vertical`). Vertical convention: ``z_convention`` "lidar" (faithful, default) or
"occ3d" (Occ3D's: ground at the grid floor, objects filled down; :func:`occ_mfd.data.convention.to_occ3d`),
recorded as ``index.json``'s top-level ``z_convention``; resuming into a folder of the other convention is refused.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from occ_mfd.data.convention import LIDAR, OCC3D, check_name, index_convention, to_occ3d
from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, load_index, merge_indexes, save_index
from occ_mfd.data.nuscenes import NuScenesSource, SceneRecord
from occ_mfd.data.occ3d import labels_path, read_labels, write_labels
from occ_mfd.data.occupancy.accumulate import AccumulatorConfig, SceneCloud, accumulate_scene
from occ_mfd.data.occupancy.generate import FrameConfig, keyframe_occupancy
from occ_mfd.data.occupancy.vertical import VerticalConfig, level_scene
from occ_mfd.data.worker_pool import imap_unordered
from occ_mfd.grid import OCC3D_GRID, GridSpec

log = logging.getLogger(__name__)

GRID_PRESETS = {"occ3d": OCC3D_GRID, "occ3d-0.8": OCC3D_GRID.pooled(2)}


@dataclass
class PrepareConfig:
    """Everything that decides the labels (recorded in index.json's ``source``)."""

    grid: GridSpec = OCC3D_GRID
    window: int | None = None
    ray_window: int = 0
    use_sweeps: bool = True
    box_margin: float = 0.2
    nn_max_dist: float = 1.0
    vertical: str = "auto"
    z_convention: str = LIDAR

    def __post_init__(self):
        VerticalConfig(mode=self.vertical)          # validates the mode
        check_name(self.z_convention)

    def vertical_cfg(self) -> VerticalConfig:
        return VerticalConfig(mode=self.vertical)

    def frame_cfg(self) -> FrameConfig:
        return FrameConfig(grid=self.grid, window=self.window, ray_window=self.ray_window)

    def acc_cfg(self) -> AccumulatorConfig:
        return AccumulatorConfig(box_margin=self.box_margin, nn_max_dist=self.nn_max_dist,
                                 use_sweeps=self.use_sweeps, dedup_across_keyframes=self.window is None)


@dataclass
class SceneResult:
    name: str
    entry: SceneEntry | None
    written: int = 0
    skipped: int = 0
    bad: list[str] = field(default_factory=list)
    seconds: float = 0.0
    vertical: dict | None = None


def shard_scenes(names: list[str], shard: tuple[int, int] | None) -> list[str]:
    """Deterministic split: the sorted names with ``i % n == k``."""
    names = sorted(names)
    if shard is None:
        return names
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise ValueError(f"shard {k}/{n}: need 0 <= K < N")
    return [s for i, s in enumerate(names) if i % n == k]


def _frame_done(path: Path, grid: GridSpec) -> bool:
    try:
        read_labels(path, grid)
        return True
    except (FileNotFoundError, ValueError):
        return False


def _clean_tmp(scene_dir: Path) -> None:
    """Remove temp files left by a killed run (write_labels' ``labels.npz.*.tmp.npz``) in our scene."""
    if scene_dir.is_dir():
        for p in scene_dir.glob("*/labels.npz.*.tmp*"):
            p.unlink(missing_ok=True)


def scene_entry(scene: SceneRecord) -> SceneEntry:
    return SceneEntry(scene.name, scene.split,
                      [FrameEntry(kf.token, kf.timestamp, kf.ego2global,
                                  {"lidar2ego": np.asarray(kf.lidar.sensor2ego, dtype=np.float64).tolist()})
                       for kf in scene.keyframes])


def _scene_todo(out: Path, name: str, scene, cfg: PrepareConfig) -> list[int]:
    """Keyframe indices of ``scene`` still to write (a file that exists and validates is done); stale temp
    files of a killed run are removed first."""
    _clean_tmp(out / "gts" / name)
    return [k for k, kf in enumerate(scene.keyframes) if not _frame_done(labels_path(out, name, kf.token), cfg.grid)]


def _scene_cloud(src: NuScenesSource, scene, cfg: PrepareConfig, res: SceneResult, skip_bad: bool):
    """The per-scene work shared by all its keyframes: vertical poses, then the accumulated points."""
    on_bad = (lambda e: res.bad.append(str(e))) if skip_bad else None
    boxes_of = lambda sw, kf: src.boxes(sw.token)
    # bad sweeps are reported once, by the accumulation below
    leveled, boxes_of, fit = level_scene(scene, boxes_of, cfg.vertical_cfg(),
                                         on_bad=(lambda e: None) if skip_bad else None)
    if cfg.vertical != "off":
        res.vertical = fit.summary()
    return leveled, accumulate_scene(leveled, boxes_of, cfg.acc_cfg(), on_bad=on_bad)


@dataclass
class _SceneState:
    """What a keyframe needs from its scene: the leveled keyframes, the accumulated cloud, where to write."""

    name: str
    out: Path
    cfg: PrepareConfig
    leveled: SceneRecord
    cloud: SceneCloud
    tokens: list[str]


def _write_keyframe(st: _SceneState, k: int) -> int:
    """Label keyframe ``k`` and write it atomically (temp file + rename); returns ``k``."""
    frame = keyframe_occupancy(st.cloud, st.leveled.keyframes[k], k, st.cfg.frame_cfg())
    if st.cfg.z_convention == OCC3D:
        frame = to_occ3d(frame, st.cfg.grid)
    write_labels(labels_path(st.out, st.name, st.tokens[k]), frame, st.cfg.grid)
    return k


def _same_state(st: _SceneState) -> _SceneState:
    return st


def prepare_scene(src: NuScenesSource, name: str, out: Path, cfg: PrepareConfig, skip_bad: bool = False,
                  max_frames: int | None = None, workers: int = 1) -> SceneResult:
    """Generate every missing keyframe of one scene; returns its index entry (None when it failed).

    ``workers`` > 1: the scene's points are accumulated here once, then its keyframes are labelled by that
    many worker processes (forked: they share the accumulated points copy-on-write), one keyframe per item.
    Every keyframe is written atomically by whoever labels it, so a killed run resumes like a serial one.
    """
    t0 = time.perf_counter()
    res = SceneResult(name, None)
    try:
        scene = src.scene(name)
        todo = _scene_todo(out, name, scene, cfg)
        res.skipped = len(scene.keyframes) - len(todo)
        if max_frames is not None:
            todo = todo[:max_frames]
        if todo:
            leveled, cloud = _scene_cloud(src, scene, cfg, res, skip_bad)
            st = _SceneState(name, out, cfg, leveled, cloud, [kf.token for kf in scene.keyframes])
            if workers <= 1 or len(todo) <= 1:
                for k in todo:
                    _write_keyframe(st, k)
                    res.written += 1
            else:
                for _ in imap_unordered(_write_keyframe, todo, functools.partial(_same_state, st), workers, inherit=st,
                                        describe=lambda k: f"scene {name} keyframe {k} ({st.tokens[k]})"):
                    res.written += 1
        res.entry = scene_entry(scene)
    except (OSError, ValueError, KeyError) as e:
        if not skip_bad:
            raise
        res.bad.append(f"scene {name}: {e}")
    res.seconds = time.perf_counter() - t0
    return res


def _prepare_task(job: tuple, src: NuScenesSource, name: str) -> SceneResult:
    """One scene in a worker process (``job`` = (out, cfg, skip_bad); ``src`` is the worker's own)."""
    return prepare_scene(src, name, *job)


def _open_source(dataroot: str, version: str) -> NuScenesSource:
    return NuScenesSource(dataroot, version)


def source_dict(src: NuScenesSource, cfg: PrepareConfig) -> dict:
    return {"kind": "nuscenes", "dataroot": str(src.dataroot), "version": src.version,
            "window": cfg.window, "ray_window": cfg.ray_window, "use_sweeps": cfg.use_sweeps,
            "box_margin": cfg.box_margin, "nn_max_dist": cfg.nn_max_dist, "lidarseg": src.has_lidarseg,
            "fill_ground": cfg.frame_cfg().fill_ground, "dedup_m": cfg.acc_cfg().dedup,
            "ego_box": [list(v) for v in cfg.acc_cfg().ego_box], "vertical": cfg.vertical}


def check_resume_convention(out, cfg: PrepareConfig) -> None:
    """Refuse to add labels of one vertical convention to a folder whose index says the other."""
    out = Path(out)
    for p in [out / "index.json", *sorted(out.glob("index.shard-*-of-*.json"))]:
        if p.is_file():
            try:
                have = index_convention(load_index(p))
            except ValueError:      # unreadable: this run rewrites it anyway
                continue
            if have is not None and have != cfg.z_convention:
                raise ValueError(f"{p}: these labels are z-convention {have!r}; refusing to add "
                                 f"{cfg.z_convention!r} labels to them (use another --out, or --z-convention {have})")


def run_prepare(dataroot, version, out, cfg: PrepareConfig = PrepareConfig(), scenes: list[str] | None = None,
                workers: int | None = None, shard: tuple[int, int] | None = None, skip_bad: bool = False,
                progress: bool = True, src: NuScenesSource | None = None) -> dict:
    """Run (or resume) the job; returns counts. Writes ``index.json`` (or the shard's partial index)."""
    out = Path(out)
    check_resume_convention(out, cfg)
    src = src or NuScenesSource(dataroot, version)
    all_names = src.scene_names()
    if scenes:
        unknown = sorted(set(scenes) - set(all_names))
        if unknown:
            raise KeyError(f"{Path(dataroot) / version}: unknown scene(s) {unknown}")
    names = shard_scenes(scenes or all_names, shard)
    nkf = {s["name"]: s["nbr_samples"] for s in src.nusc.scene}
    workers = workers or min(4, os.cpu_count() or 1)
    results: list[SceneResult] = []
    bar = tqdm(total=sum(nkf[n] for n in names), unit="kf", disable=not progress, desc="prepare")
    if workers <= 1:
        for n in names:
            results.append(prepare_scene(src, n, out, cfg, skip_bad))
            bar.update(nkf[n])
    elif len(names) < workers:
        # Fewer scenes than workers: scene-level parallelism would leave workers idle, so go scene by scene
        # and split each scene's keyframes among all the workers (its accumulation runs here, once).
        for n in names:
            results.append(prepare_scene(src, n, out, cfg, skip_bad, workers=workers))
            bar.update(nkf[n])
    else:
        # The devkit index is built once per worker process (or shared from ours under fork), never per scene.
        task = functools.partial(_prepare_task, (out, cfg, skip_bad))
        init = functools.partial(_open_source, str(dataroot), version)
        for r in imap_unordered(task, names, init, workers, inherit=src, describe=lambda n: f"scene {n}"):
            results.append(r)
            bar.update(nkf[r.name])
    bar.close()
    order = {n: i for i, n in enumerate(names)}
    results.sort(key=lambda r: order[r.name])
    bad = [b for r in results for b in r.bad]
    for b in bad:
        log.warning("skipped bad input: %s", b)
    idx = DatasetIndex(cfg.grid, [r.entry for r in results if r.entry is not None], source_dict(src, cfg),
                       extra={"z_convention": cfg.z_convention})
    if shard is None:
        save_index(out, idx)
    else:
        k, n = shard
        save_index(out, idx, f"index.shard-{k}-of-{n}.json")
        merge_shards(out, n)
    return {"scenes": len(names), "written": sum(r.written for r in results),
            "skipped": sum(r.skipped for r in results), "bad": len(bad), "bad_messages": bad,
            "vertical": {r.name: r.vertical for r in results if r.vertical is not None}}


def merge_shards(out, n: int) -> bool:
    """Merge ``index.shard-*-of-n.json`` into ``index.json`` once all ``n`` exist; returns whether it did."""
    out = Path(out)
    paths = [out / f"index.shard-{k}-of-{n}.json" for k in range(n)]
    if not all(p.is_file() for p in paths):
        return False
    merged = merge_indexes([load_index(p) for p in paths])
    merged.scenes.sort(key=lambda s: s.name)
    save_index(out, merged)
    return True


def dry_run(dataroot, version, cfg: PrepareConfig = PrepareConfig(), scenes=None, workers=None, shard=None,
            src: NuScenesSource | None = None, startup_seconds: float = 0.0) -> dict:
    """Estimate time and disk by preparing the first scene's first, middle and last keyframes in memory (nothing
    written).

    Per scene: its accumulation (vertical poses + points; the first scene's, per keyframe, × its keyframes).
    Per keyframe: the mean of the sampled keyframes (one keyframe alone underestimates: the first sees only the
    sweeps after it, a middle one sweeps on both sides) + compressing its labels.
    Wall time: ``startup_seconds`` (the caller's imports before this call: the CLI measures its own) + loading the
    devkit tables (measured here, when this call loads them) + the schedule of
    :func:`run_prepare`: with at least as many scenes as workers a scene is the unit of parallel work (per
    keyframe = accumulation amortised + labelling, × the busiest worker's keyframes, and no schedule finishes
    before its longest scene); with fewer scenes than workers (``within_scene``) the scenes run one after
    another, each accumulated once and its keyframes shared out: Σ (accumulation + ⌈keyframes / W⌉ × labelling).
    """
    t0 = time.perf_counter()
    src = src or NuScenesSource(dataroot, version)
    t_setup = startup_seconds + time.perf_counter() - t0
    names = shard_scenes(scenes or src.scene_names(), shard)
    nkf = {s["name"]: s["nbr_samples"] for s in src.nusc.scene}
    total = sum(nkf[n] for n in names)
    t_acc, t_frame, t_zip, nbytes, n, timed = _time_first_scene(src, names[0], cfg)
    acc_per_kf = t_acc / max(1, n)
    t_label = t_frame + t_zip
    per_kf = acc_per_kf + t_label
    workers = workers or min(4, os.cpu_count() or 1)
    within = 1 < workers and len(names) < workers
    parallel = 1 if within else max(1, min(workers, len(names)))
    if within:
        seconds = t_setup + sum(acc_per_kf * nkf[n_] + math.ceil(nkf[n_] / workers) * t_label for n_ in names)
    else:
        seconds = t_setup + per_kf * max(total / parallel, max(nkf[n_] for n_ in names))
    return {"keyframes": total, "scenes": len(names), "seconds_per_keyframe": per_kf,
            "accumulate_seconds_per_keyframe": acc_per_kf, "label_seconds_per_keyframe": t_label,
            "keyframes_timed": timed, "setup_seconds": t_setup, "estimated_seconds": seconds,
            "estimated_hours": seconds / 3600, "workers": workers, "parallel_scenes": parallel,
            "within_scene": within, "bytes_per_frame": nbytes, "estimated_gb": nbytes * total / 1e9}


def _time_first_scene(src: NuScenesSource, name: str, cfg: PrepareConfig):
    """(accumulation s, labelling s per keyframe, compression s per keyframe, bytes per frame, keyframes,
    keyframes timed) for scene ``name``: its first, middle and last keyframes labelled in memory."""
    scene = src.scene(name)
    t0 = time.perf_counter()
    scene, boxes_of, _ = level_scene(scene, lambda sw, kf: src.boxes(sw.token), cfg.vertical_cfg())
    cloud = accumulate_scene(scene, boxes_of, cfg.acc_cfg())
    t_acc = time.perf_counter() - t0
    n = len(scene.keyframes)
    sampled = sorted({0, n // 2, n - 1}) if n else []
    t0 = time.perf_counter()
    for k in sampled:
        frame = keyframe_occupancy(cloud, scene.keyframes[k], k, cfg.frame_cfg())
    t_frame = (time.perf_counter() - t0) / max(1, len(sampled))
    t0 = time.perf_counter()            # each keyframe is also compressed and written: time the compression
    buf = io.BytesIO()
    if sampled:
        np.savez_compressed(buf, semantics=frame.semantics, mask_lidar=frame.mask_lidar,
                            mask_camera=frame.mask_camera)
    return t_acc, t_frame, time.perf_counter() - t0, buf.getbuffer().nbytes, n, len(sampled)
