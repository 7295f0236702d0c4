"""Vertical conventions of occupancy labels: where the road sits in z, and how far down objects reach.

Two conventions exist for labels on the Occ3D-nuScenes grid (z ∈ [−1, 5.4) m, 0.4 m voxels, in the ego
frame whose origin lies on the ground under the rear axle):

* ``lidar`` — faithful to the sensor (our ``prepare`` and the synthetic truth): the road lies at ego z ≈ 0,
  i.e. in the layer holding z = 0 (:func:`ground_layer`: z-index 2 on the Occ3D grid); an object occupies
  what its points (or its solid) occupy, from the road up.
* ``occ3d`` — what the released Occ3D-nuScenes labels do. Measured on the one real frame we hold (scene-1077,
  ``../shared/nuscenes_real/CVPR2023-3D-Occupancy-Prediction``): all 8,433 road voxels at z-index 0,
  sidewalk at 0–1, terrain mostly 0; every car column from index 0 up to 4–6 (tops at 1.4–1.8 m, where a
  road at z ≈ 0 puts them), a bus 0–11, walls and tree trunks down to 0, tree crowns over the road not;
  object voxels are all "observed" (mask_lidar 1) while the two layers over the road are not (1–2 %).
  Public threads on the Occ3D repositories report the same (a pedestrian 7 voxels = 2.8 m tall), and the
  maintainers confirm the labels are in the ego frame. So: the ground is drawn :func:`ground_layer` layers
  lower (z-index 0 for a road at z ≈ 0, its relief kept), and everything standing on the ground is extended
  down to that lowered ground, tops unchanged. :func:`to_occ3d` applies exactly this to ``lidar`` labels.

A model trained on one convention and scored on the other loses for the convention alone (the road and
every object bottom are 0.8 m off). So ``index.json`` records ``"z_convention"`` at its top level
(``prepare --z-convention``; the Occ3D import says ``occ3d``; indexes written before it existed are
``lidar`` when ``prepare`` or the synthetic truth wrote them), and :func:`check_conventions` refuses to
compare labels (or a model's training labels) of different conventions unless told to.
:func:`estimate_convention` tells the convention of any labels from the data alone (the ground classes'
z-mode and the height of object bottoms), e.g. ``tools/prepare_data.py convention DIR``.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from occ_mfd.data.occ3d import OccFrame, labels_path, read_labels
from occ_mfd.data.index import load_index
from occ_mfd.grid import FREE_ID, OCC3D_GRID, GridSpec

LIDAR, OCC3D = "lidar", "occ3d"
Z_CONVENTIONS = (LIDAR, OCC3D)
UNKNOWN = "unknown"
#: Ground classes (driveable_surface, other_flat, sidewalk, terrain) and the object classes whose bottoms tell
#: the convention (barrier … truck: things standing on the ground; not "others", which is everything static in
#: labels made without lidarseg).
GROUND_IDS = (11, 12, 13, 14)
DRIVEABLE = 11
OBJECT_IDS = tuple(range(1, 11))
#: The released OccFM was trained on Occ3D-nuScenes (its snapshots carry this git_rev, see tools/import_occfm.py).
OCCFM_GIT_REV = "upstream OccFM"

_DESCRIBE = {LIDAR: "road at the ego ground (z ≈ 0), objects from the road up",
             OCC3D: "road drawn at the grid floor, objects filled down to it"}


def ground_layer(grid: GridSpec = OCC3D_GRID) -> int:
    """The z-index of the layer holding ego z = 0 (the ground under the ego): 2 on the Occ3D grid."""
    return int(np.floor(-grid.lo[2] / grid.voxel_size))


def check_name(conv: str | None) -> str | None:
    if conv is not None and conv not in Z_CONVENTIONS:
        raise ValueError(f"z-convention must be one of {Z_CONVENTIONS}, got {conv!r}")
    return conv


# ------------------------------------------------------------------------------------ declared conventions

def index_convention(index) -> str | None:
    """The convention a ``DatasetIndex`` declares: its top-level ``z_convention``; else ``occ3d`` for the Occ3D
    import and ``lidar`` for ``prepare``/synthetic-truth indexes written before the field existed; else None."""
    conv = index.extra.get("z_convention") if hasattr(index, "extra") else None
    if conv is not None:
        return check_name(conv)
    src = getattr(index, "source", {}) or {}
    if src.get("type") == "occ3d":
        return OCC3D
    if src.get("kind") in ("nuscenes", "synthetic-truth"):
        return LIDAR
    return None


def folder_convention(root: str | os.PathLike) -> str | None:
    """:func:`index_convention` of ``root/index.json`` (None when there is none or it does not say)."""
    p = Path(root)
    if not (p / "index.json").is_file() and not p.is_file():
        return None
    return index_convention(load_index(p))


def snapshot_convention(data: dict | None, git_rev: str = "", config: str = "") -> str | None:
    """The convention of a model's training labels, best effort: the snapshot's ``data["z_convention"]``; the
    imported OccFM (git_rev ``upstream OccFM``) → ``occ3d``; else the convention of the training config's
    ``data.root`` when that folder is readable from here; else None (unknown: nothing is refused)."""
    conv = (data or {}).get("z_convention")
    if conv is not None:
        return check_name(conv)
    if git_rev == OCCFM_GIT_REV:
        return OCC3D
    m = re.search(r"^data\s*=\s*(?:dict\(|\{)(.*?)(?:\n\S|\Z)", config or "", re.S | re.M)
    root = re.search(r"\broot['\"]?\s*[=:]\s*['\"]([^'\"]+)['\"]", m.group(1) if m else "")
    if root:
        try:
            return folder_convention(root.group(1))
        except (OSError, ValueError):
            return None
    return None


def check_conventions(a: str | None, b: str | None, what_a: str, what_b: str, allow: bool = False) -> bool:
    """Raise ValueError when ``a`` and ``b`` are known and differ (returns True instead with ``allow``);
    False when they agree or one is unknown."""
    if a is None or b is None or a == b:
        return False
    if allow:
        return True
    raise ValueError(
        f"vertical convention mismatch: {what_a} is z-convention {a!r} ({_DESCRIBE.get(a, a)}) but {what_b} is "
        f"{b!r} ({_DESCRIBE.get(b, b)}); the road and every object bottom differ by "
        f"{ground_layer()} layers, so the scores would measure the convention, not the labels or the model. "
        f"Prepare the labels with the other --z-convention (tools/prepare_data.py --z-convention {b}), or pass "
        f"--allow-convention-mismatch to compare anyway.")


# ------------------------------------------------------------------------------------ lidar → occ3d

def _ground_ref(g_top: np.ndarray, need: np.ndarray, k0: int, reach: int = 3) -> np.ndarray:
    """Per column, the ground's top layer: its own where it has ground, else the median of the ground tops
    within ``reach`` columns (under a car the road is hidden), else the ego ground ``k0``."""
    ref = np.where(g_top >= 0, g_top, k0)
    X, Y = g_top.shape
    for i, j in zip(*np.nonzero(need & (g_top < 0))):
        win = g_top[max(i - reach, 0):i + reach + 1, max(j - reach, 0):j + reach + 1]
        win = win[win >= 0]
        if len(win):
            ref[i, j] = int(np.median(win))
    return ref


def _fill_down(out, oml, omc, mc, has, bottom, cls, floor) -> None:
    """In columns ``has``, set layers floor ≤ z < bottom to ``cls`` (observed; camera mask of the bottom voxel)."""
    z = np.arange(out.shape[2])
    fill = has[..., None] & (z >= floor[..., None]) & (z < bottom[..., None])
    out[fill] = np.broadcast_to(cls[..., None], out.shape)[fill]
    oml[fill] = 1
    bi = np.clip(bottom, 0, out.shape[2] - 1)
    cam = np.take_along_axis(mc, bi[..., None], axis=2)[..., 0]
    omc[fill] = np.broadcast_to(cam[..., None], out.shape)[fill]


def to_occ3d(frame: OccFrame, grid: GridSpec = OCC3D_GRID) -> OccFrame:
    """``lidar``-convention labels → the ``occ3d`` convention (see the module docstring).

    Ground-class voxels move :func:`ground_layer` layers down (clipped at the floor; the ground's relief is
    kept). What stands on the ground reaches down to the lowered ground, with its class, marked observed:
    each connected object (classes barrier … truck, 26-connected) whose lowest voxel is at most one layer
    above the ground under it — every column of it; and in each column the lowest static run (others,
    manmade, vegetation) when its bottom is that low (a wall, a trunk; not a crown over the road). The
    ground under a column without ground of its own is the median of the ground tops within 3 columns (the
    road under a car), else the ego ground. Objects win over the moved ground. Voxels the ground left become
    free and unobserved (Occ3D leaves the layers over its road unobserved). Returns a new frame.
    """
    from scipy.ndimage import label

    sem, ml, mc = frame.semantics, frame.mask_lidar, frame.mask_camera
    Z = sem.shape[2]
    k0 = ground_layer(grid)
    z = np.arange(Z)
    g = np.isin(sem, GROUND_IDS)
    mov = np.isin(sem, OBJECT_IDS)
    stat = (sem != FREE_ID) & ~g & ~mov
    out = np.full_like(sem, FREE_ID)
    oml, omc = ml.copy(), mc.copy()
    # 1. the ground, lowered by k0 layers (several voxels landing in one: the highest wins)
    gi, gj, gk = np.nonzero(g)
    order = np.argsort(gk, kind="stable")
    gi, gj, gk = gi[order], gj[order], gk[order]
    nk = np.maximum(gk - k0, 0)
    out[gi, gj, nk] = sem[gi, gj, gk]
    oml[gi, gj, nk] = ml[gi, gj, gk]
    omc[gi, gj, nk] = mc[gi, gj, gk]
    # 2. everything else stays where it is
    out[mov | stat] = sem[mov | stat]
    g_top = np.where(g, z, -1).max(axis=2)
    g_ref = _ground_ref(g_top, (mov | stat).any(axis=2), k0)
    floor = np.maximum(g_ref - k0, 0)
    # 3a. static columns: the lowest static run, when it starts on the ground
    has = stat.any(axis=2)
    bottom = np.where(stat, z, Z).min(axis=2)
    cls = np.take_along_axis(sem, np.clip(bottom, 0, Z - 1)[..., None], axis=2)[..., 0]
    _fill_down(out, oml, omc, mc, has & (bottom <= g_ref + 1), bottom, cls, floor)
    # 3b. objects: whole connected objects resting on the ground
    lab, n = label(mov, structure=np.ones((3, 3, 3), bool))
    if n:
        li, lj, lk = np.nonzero(lab)
        comp = lab[li, lj, lk] - 1
        cb = np.full(n, Z)
        np.minimum.at(cb, comp, lk)
        cg = np.full(n, Z)
        np.minimum.at(cg, comp, g_ref[li, lj])
        resting = cb <= cg + 1
        sel = resting[comp]
        col_bottom = np.full(sem.shape[:2], Z)
        np.minimum.at(col_bottom, (li[sel], lj[sel]), lk[sel])
        has = col_bottom < Z
        cls = np.take_along_axis(sem, np.clip(col_bottom, 0, Z - 1)[..., None], axis=2)[..., 0]
        _fill_down(out, oml, omc, mc, has, col_bottom, cls, floor)
    # 4. where the ground was and nothing is now: free, unobserved
    left = g & (out == FREE_ID)
    oml[left] = 0
    omc[left] = 0
    return OccFrame(out, oml, omc)


# ------------------------------------------------------------------------------------ estimating it

@dataclass
class ConventionEstimate:
    """What :func:`estimate_convention` found. Histograms are per z-index, summed over the frames.

    ground_source: which voxels stood for the ground ("driveable_surface", "ground classes", or "lowest
    occupied voxel per column" for labels without ground classes). bottom_hist: the lowest object voxel
    (classes barrier … truck) of each object column. floor_share: share of object columns whose bottom is
    at z-index 0. object_height_m: median height of object columns (bottom to top, m)."""

    convention: str
    frames: int
    ground_layer: int
    ground_source: str
    ground_hist: np.ndarray
    ground_mode: int
    bottom_hist: np.ndarray
    object_columns: int
    floor_share: float
    object_height_m: float
    voxel_size: float

    def summary(self) -> str:
        gz = self.ground_mode * self.voxel_size - self.ground_layer * self.voxel_size
        lines = [f"estimated z-convention: {self.convention}  ({self.frames} frame(s); the ego ground z = 0 is "
                 f"z-index {self.ground_layer})",
                 f"  ground ({self.ground_source}): mode z-index {self.ground_mode} (≈ {gz:+.1f} m from the ego "
                 f"ground); voxels per z-index {self.ground_hist.tolist()}",
                 f"  object bottoms: {self.object_columns} object columns, {100 * self.floor_share:.1f} % at "
                 f"z-index 0; per z-index {self.bottom_hist.tolist()}; median column height "
                 f"{self.object_height_m:.1f} m"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"convention": self.convention, "frames": self.frames, "ground_layer": self.ground_layer,
                "ground_source": self.ground_source, "ground_hist": self.ground_hist.tolist(),
                "ground_mode": self.ground_mode, "bottom_hist": self.bottom_hist.tolist(),
                "object_columns": self.object_columns, "floor_share": self.floor_share,
                "object_height_m": self.object_height_m}


def estimate_convention(volumes: Iterable[np.ndarray], grid: GridSpec = OCC3D_GRID) -> ConventionEstimate:
    """Estimate the convention of (X, Y, Z) semantics volumes.

    ``lidar`` when the ground's z-mode is within one layer of :func:`ground_layer` and fewer than 30 % of the
    object columns start at z-index 0; ``occ3d`` when the ground's mode is z-index 0 (below the ego ground)
    and at least half of the object columns start there (or there are no objects); else ``unknown``.
    """
    k0 = ground_layer(grid)
    Z = grid.shape[2]
    drive = np.zeros(Z, np.int64)
    ground = np.zeros(Z, np.int64)
    lowest = np.zeros(Z, np.int64)
    bottoms = np.zeros(Z, np.int64)
    heights: list[np.ndarray] = []
    n = 0
    for sem in volumes:
        sem = np.asarray(sem)
        n += 1
        drive += (sem == DRIVEABLE).sum(axis=(0, 1))
        ground += np.isin(sem, GROUND_IDS).sum(axis=(0, 1))
        occ = sem != FREE_ID
        col = occ.any(axis=2)
        lowest += np.bincount(np.argmax(occ, axis=2)[col], minlength=Z)[:Z]
        o = np.isin(sem, OBJECT_IDS)
        oc = o.any(axis=2)
        b = np.argmax(o, axis=2)[oc]
        t = (Z - 1 - np.argmax(o[:, :, ::-1], axis=2))[oc]
        bottoms += np.bincount(b, minlength=Z)[:Z]
        heights.append((t - b + 1) * grid.voxel_size)
    if drive.sum() >= 100:
        hist, source = drive, "driveable_surface"
    elif ground.sum() >= 100:
        hist, source = ground, "ground classes"
    else:
        hist, source = lowest, "lowest occupied voxel per column"
    mode = int(np.argmax(hist)) if hist.sum() else -1
    n_obj = int(bottoms.sum())
    floor = float(bottoms[0] / n_obj) if n_obj else float("nan")
    h = np.concatenate(heights) if heights else np.zeros(0)
    if mode >= max(k0 - 1, 1) and (n_obj == 0 or floor < 0.3):
        conv = LIDAR
    elif mode == 0 and k0 >= 1 and (n_obj == 0 or floor >= 0.5):
        conv = OCC3D
    else:
        conv = UNKNOWN
    return ConventionEstimate(conv, n, k0, source, hist, mode, bottoms, n_obj, floor,
                              float(np.median(h)) if len(h) else float("nan"), grid.voxel_size)


def labels_files(root: str | os.PathLike, max_frames: int | None = None) -> list[Path]:
    """The labels files of a folder: those its ``index.json`` lists (in order), or every ``**/labels.npz``."""
    root = Path(root)
    if root.is_file():
        return [root]
    if (root / "index.json").is_file():
        d = json.loads((root / "index.json").read_text())
        files = [labels_path(root, s["name"], f["token"]) for s in d.get("scenes", []) for f in s.get("frames", [])
                 if f.get("labels", True)]
        files = [f for f in files if f.is_file()]
    else:
        files = sorted(root.rglob("labels.npz"))
    return files[:max_frames] if max_frames else files


def estimate_folder(root: str | os.PathLike, max_frames: int | None = None,
                    grid: GridSpec | None = None) -> tuple[ConventionEstimate, str | None]:
    """(estimate over the folder's labels files, the convention its index declares or None)."""
    root = Path(root)
    declared = None
    if (root / "index.json").is_file():
        idx = load_index(root)
        grid = grid or idx.grid
        declared = index_convention(idx)
    grid = grid or OCC3D_GRID
    files = labels_files(root, max_frames)
    if not files:
        raise FileNotFoundError(f"{root}: no labels.npz found")
    est = estimate_convention((read_labels(f, grid).semantics for f in files), grid)
    return est, declared
