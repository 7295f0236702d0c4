"""The Occ3D-nuScenes on-disk label format: ``gts/<scene_name>/<sample_token>/labels.npz``.

Each file is an ``np.savez_compressed`` archive with exactly the keys ``semantics``, ``mask_lidar`` and
``mask_camera``, each (X, Y, Z) uint8 (Occ3D: (200, 200, 16)); semantics hold Occ3D ids 0..17 (17 = free),
masks hold 0/1. We deliberately add *no* extra key (e.g. the grid): the grid lives in ``index.json``,
so our files are byte-for-byte the same kind of archive Occ3D ships and any Occ3D reader loads them.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from occ_mfd.atomic import atomic_write
from occ_mfd.grid import NUM_CLASSES, OCC3D_GRID, GridSpec

LABEL_KEYS = ("semantics", "mask_lidar", "mask_camera")
LABELS_FILENAME = "labels.npz"


@dataclass
class OccFrame:
    """One keyframe's labels.

    Attributes:
        semantics: (X, Y, Z) uint8 Occ3D ids 0..17 (17 = free).
        mask_lidar: (X, Y, Z) uint8 0/1, voxels observed by the LiDAR.
        mask_camera: (X, Y, Z) uint8 0/1, voxels visible in the cameras (equals mask_lidar when
            the source has no camera calibrations).
    """

    semantics: np.ndarray
    mask_lidar: np.ndarray
    mask_camera: np.ndarray


def read_npz(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (no pickles). FileNotFoundError / ValueError name the file and ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable .npz archive (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from e


def labels_path(root: str | os.PathLike, scene_name: str, token: str) -> Path:
    """``root/gts/<scene_name>/<token>/labels.npz``."""
    return Path(root) / "gts" / scene_name / token / LABELS_FILENAME


def _check_arrays(where: str, arrays: dict, grid: GridSpec | None, check_values: bool = True) -> None:
    """Raise ValueError naming ``where`` when a key, shape, dtype or value range is wrong."""
    missing = [k for k in LABEL_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; found {sorted(arrays)}, "
                         f"expected {list(LABEL_KEYS)}")
    shape0 = tuple(arrays["semantics"].shape)
    for k in LABEL_KEYS:
        a = arrays[k]
        if a.ndim != 3:
            raise ValueError(f"{where}: {k!r} has shape {tuple(a.shape)}, expected 3 dims (X, Y, Z)")
        if grid is not None and tuple(a.shape) != tuple(grid.shape):
            raise ValueError(f"{where}: {k!r} has shape {tuple(a.shape)}, expected {tuple(grid.shape)}")
        if tuple(a.shape) != shape0:
            raise ValueError(f"{where}: {k!r} has shape {tuple(a.shape)}, but 'semantics' has {shape0}")
        if a.dtype != np.uint8:
            raise ValueError(f"{where}: {k!r} has dtype {a.dtype}, expected uint8")
    if check_values:
        smax = int(arrays["semantics"].max()) if arrays["semantics"].size else 0
        if smax >= NUM_CLASSES:
            raise ValueError(f"{where}: 'semantics' holds value {smax}, expected Occ3D ids 0..{NUM_CLASSES - 1}")
        for k in ("mask_lidar", "mask_camera"):
            mmax = int(arrays[k].max()) if arrays[k].size else 0
            if mmax > 1:
                raise ValueError(f"{where}: {k!r} holds value {mmax}, expected 0/1")


def write_labels(path: str | os.PathLike, frame: OccFrame, grid: GridSpec | None = OCC3D_GRID) -> Path:
    """Validate ``frame`` and write it atomically to ``path`` (temp file in the same dir, then rename).

    Arrays must be uint8 of ``grid.shape`` (no check when ``grid`` is None); bool masks are accepted.

    A crash at any moment leaves either the old file or the new one, never a partial one; the temp file
    is removed on error. Temp names contain ``.tmp`` so :func:`verify_dataset` can spot leftovers.
    """
    path = Path(path)
    arrays = {k: getattr(frame, k) for k in LABEL_KEYS}
    for k in ("mask_lidar", "mask_camera"):  # bool masks (what ray casting yields) are stored as 0/1 uint8
        if isinstance(arrays[k], np.ndarray) and arrays[k].dtype == bool:
            arrays[k] = arrays[k].astype(np.uint8)
    _check_arrays(f"{path} (writing)", arrays, grid)
    # a file object, so savez cannot append ".npz" to the temp name
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays), suffix=".npz")


def read_labels(path: str | os.PathLike, grid: GridSpec | None = None) -> OccFrame:
    """Read and validate one ``labels.npz``.

    Args:
        path: the file.
        grid: when given, every array must have ``grid.shape``.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable/truncated archive, missing key, wrong shape/dtype, values out of range;
            the message names the file.
    """
    path = Path(path)
    arrays = read_npz(path, "Occ3D labels file")
    _check_arrays(str(path), arrays, grid)
    return OccFrame(*(arrays[k] for k in LABEL_KEYS))

