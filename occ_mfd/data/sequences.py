"""Windows of consecutive keyframes from a prepared dataset (``index.json`` + Occ3D-layout labels).

A window is ``past`` frames (the last one is the *current* frame) followed by ``future`` frames, all
inside one scene. Windows start every ``stride`` frames; a scene with fewer than ``past + future``
frames contributes none, and windows touching a frame the index marks ``"labels": false`` are skipped.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from occ_mfd.data.index import DatasetIndex, load_index
from occ_mfd.data.occ3d import labels_path, read_labels
from occ_mfd.data.pool import pool_mask, pool_semantics
from occ_mfd.data.records import OccSequence
from occ_mfd.grid import GridSpec

MASKS = {"camera": "mask_camera", "lidar": "mask_lidar", None: None}


def relative_poses(ego2global: np.ndarray, current: int) -> np.ndarray:
    """(T, 4, 4) ego→global poses → (T, 4, 4) float32 poses in the ego frame of frame ``current``:
    ``inv(ego2global[current]) @ ego2global[k]`` (so entry ``current`` is the identity)."""
    e = np.asarray(ego2global, dtype=np.float64)
    return (np.linalg.inv(e[current])[None] @ e).astype(np.float32)


def lidar_displacements(ego2global: np.ndarray, lidar2ego: np.ndarray) -> np.ndarray:
    """(N, 4, 4) ego→global poses and (N, 4, 4) LiDAR→ego calibrations of N consecutive keyframes → (N-1, 2)
    float32: row k = (dx, dy) in metres of the LiDAR origin from keyframe k to k+1, in keyframe k's LiDAR frame
    (nuScenes LIDAR_TOP: x right, y forward), i.e. the translation of ``inv(E_k L_k) · E_{k+1} L_{k+1}``.

    This is the ego-trajectory convention of VAD's nuScenes converter that the released OccFM was trained on
    (``gt_ego_fut_trajs[0]`` per frame; PORT.md §3): the LiDAR frame, not the ego frame, and a step to the next
    keyframe, not a pose in the current frame.
    """
    e = np.asarray(ego2global, dtype=np.float64) @ np.asarray(lidar2ego, dtype=np.float64)   # (N, 4, 4) lidar→global
    if len(e) < 2:
        return np.zeros((0, 2), dtype=np.float32)
    step = np.linalg.inv(e[:-1]) @ e[1:]                                                       # (N-1, 4, 4)
    return step[:, :2, 3].astype(np.float32)


class OccSequenceDataset(Dataset):
    """Torch dataset of :class:`OccSequence` windows.

    Args:
        root: prepared folder holding ``index.json`` and ``gts/``.
        split: scenes whose index split equals this (None: all scenes).
        past: history length incl. the current frame (P); future: frames to forecast (F).
        pool: load-time downsampling factor (see :mod:`occ_mfd.data.pool`); ``.grid`` is the pooled grid.
        mask: which visibility mask feeds ``mask_future`` ("camera", "lidar" or None for no mask).
        stride: step between consecutive window starts.
        cache_mb: keep up to this many MB of loaded (pooled) frames in memory, least recently used out first
            (0: none). Why: with stride 1 every frame belongs to up to P+F windows, and reading + decompressing
            + pooling a label file costs more than a tiny model's training step on a CPU; the demo's whole
            pooled dataset is ~25 MB. Per dataset instance (each DataLoader worker holds its own).

    Item: OccSequence with past (P, X, Y, Z) uint8, future (F, X, Y, Z) uint8, ego (P+F, 4, 4) float32,
    mask_future (F, X, Y, Z) bool or None, scene, tokens (P+F), and lidar_traj (P+F, 2) float32 (each frame's
    LiDAR displacement to the next keyframe, :func:`lidar_displacements`; zero after a scene's last keyframe)
    when the index records every frame's ``lidar2ego``, else None.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "train", past: int = 4, future: int = 6,
                 pool: int = 1, mask: str | None = "camera", stride: int = 1, cache_mb: float = 0.0):
        if past < 1 or future < 0 or stride < 1 or pool < 1:
            raise ValueError(f"OccSequenceDataset: need past ≥ 1, future ≥ 0, stride ≥ 1, pool ≥ 1; "
                             f"got past={past}, future={future}, stride={stride}, pool={pool}")
        if mask not in MASKS:
            raise ValueError(f"OccSequenceDataset: mask must be 'camera', 'lidar' or None, got {mask!r}")
        self.root = Path(root)
        self.index: DatasetIndex = load_index(self.root)
        self.source_grid = self.index.grid
        if any(n % pool for n in self.source_grid.shape):
            raise ValueError(f"OccSequenceDataset: grid shape {self.source_grid.shape} of {self.root} is not "
                             f"divisible by pool={pool}")
        self.grid: GridSpec = self.source_grid.pooled(pool) if pool > 1 else self.source_grid
        self.split, self.past, self.future, self.pool = split, past, future, pool
        self.mask_key, self.stride = MASKS[mask], stride
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._cached_bytes = 0
        length = past + future
        self.windows: list[tuple[int, int]] = []  # (scene position in index.scenes, first frame)
        for si, scene in enumerate(self.index.scenes):
            if split is not None and scene.split != split:
                continue
            ok = np.array([f.has_labels for f in scene.frames], dtype=bool)
            for start in range(0, len(scene.frames) - length + 1, stride):
                if ok[start:start + length].all():
                    self.windows.append((si, start))
        if not self.windows:
            splits = sorted({s.split for s in self.index.scenes})
            raise ValueError(f"{self.root}: no windows of {past}+{future} consecutive labelled keyframes in "
                             f"split {split!r} (splits in index.json: {splits})")

    def __len__(self) -> int:
        return len(self.windows)

    def _load(self, scene: str, token: str) -> tuple[np.ndarray, np.ndarray | None]:
        key = (scene, token)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fr = read_labels(labels_path(self.root, scene, token), self.source_grid)
        sem = pool_semantics(fr.semantics, self.pool)
        m = None if self.mask_key is None else pool_mask(getattr(fr, self.mask_key), self.pool).astype(bool)
        size = sem.nbytes + (0 if m is None else m.nbytes)
        if size <= self.cache_bytes:
            sem.setflags(write=False)               # shared by every window that holds the frame
            if m is not None:
                m.setflags(write=False)
            self._cache[key] = (sem, m)
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                old_sem, old_m = self._cache.popitem(last=False)[1]
                self._cached_bytes -= old_sem.nbytes + (0 if old_m is None else old_m.nbytes)
        return sem, m

    def __getitem__(self, i: int) -> OccSequence:
        si, start = self.windows[i]
        scene = self.index.scenes[si]
        frames = scene.frames[start:start + self.past + self.future]
        tokens = [f.token for f in frames]
        loaded = [self._load(scene.name, t) for t in tokens]
        sem = np.stack([s for s, _ in loaded])                                     # (P+F, X, Y, Z)
        ego = relative_poses(np.stack([f.ego2global for f in frames]), self.past - 1)  # (P+F, 4, 4)
        mask_future = None
        if self.mask_key is not None:
            fut = [m for _, m in loaded[self.past:]]
            mask_future = np.stack(fut) if fut else np.zeros((0, *self.grid.shape), dtype=bool)
        return OccSequence(past=sem[:self.past], future=sem[self.past:], ego=ego, mask_future=mask_future,
                           scene=scene.name, tokens=tokens, grid=self.grid,
                           lidar_traj=self._lidar_traj(scene.frames, start, len(frames)))

    @staticmethod
    def _lidar_traj(frames: list, start: int, length: int) -> np.ndarray | None:
        """(length, 2) LiDAR displacements of frames[start:start+length] to their next keyframe (the frame after
        the window included; zero after the scene's last keyframe), or None without lidar2ego in the index."""
        span = frames[start:start + length + 1]
        calib = [f.lidar2ego for f in span]
        if any(c is None for c in calib):
            return None
        out = np.zeros((length, 2), dtype=np.float32)
        d = lidar_displacements(np.stack([f.ego2global for f in span]), np.stack(calib))   # (len(span)-1, 2)
        out[:len(d)] = d
        return out
