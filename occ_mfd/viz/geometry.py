"""Grid → drawable geometry, numpy only (no Open3D): voxel centres and colours, cube meshes, error
views, the ego marker, camera presets and legend entries. Everything here is exact and tested; the
renderers in :mod:`occ_mfd.viz.render` only draw what this module computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from occ_mfd.ego import NUSCENES_EGO, EgoVehicle
from occ_mfd.grid import FREE_ID, OCC3D_CLASSES, PALETTE, GridSpec

#: Error view codes and colours: a voxel is free in both (hidden), correct, occupied in both with the
#: wrong class, a false positive (pred occupied, GT free) or a false negative (GT occupied, pred free).
ERR_FREE, ERR_TP, ERR_WRONG, ERR_FP, ERR_FN = 0, 1, 2, 3, 4
ERROR_NAMES = ("free", "correct", "wrong class", "false positive", "false negative")
ERROR_PALETTE = np.array([[255, 255, 255], [190, 190, 190], [255, 165, 0], [220, 20, 60], [30, 90, 255]],
                         dtype=np.uint8)

#: Brightness per cube face (−x, +x, −y, +y, −z, +z): baked-in shading so unlit renders still show 3-D
#: shape while top faces keep the exact palette colour (what a bird's-eye view sees).
FACE_SHADE = np.array([0.75, 0.75, 0.6, 0.6, 0.45, 1.0])


def voxel_centers(sem: np.ndarray, grid: GridSpec, hide=(FREE_ID,), classes=None,
                  palette: np.ndarray = PALETTE):
    """Occupied voxels of a label grid.

    Args:
        sem: (X, Y, Z) integer labels with shape ``grid.shape``.
        hide: labels never drawn (free by default).
        classes: if given, only these labels are drawn (a class filter).
        palette: (K, 3) uint8 colour per label.
    Returns:
        centers (N, 3) float64 metric centres, labels (N,) int64, colors (N, 3) uint8 = ``palette[labels]``;
        voxels in C order of (x, y, z) index.
    """
    sem = np.asarray(sem)
    if tuple(sem.shape) != tuple(grid.shape):
        raise ValueError(f"voxel_centers: label grid has shape {sem.shape}, grid expects {grid.shape}")
    keep = ~np.isin(sem, np.asarray(hide, dtype=np.int64))
    if classes is not None:
        keep &= np.isin(sem, np.asarray(list(classes), dtype=np.int64))
    idx = np.argwhere(keep)                                                          # (N, 3)
    labels = sem[keep].astype(np.int64)
    if labels.size and labels.max() >= len(palette):
        raise ValueError(f"voxel_centers: label {labels.max()} has no palette colour ({len(palette)} colours)")
    return grid.index_to_center(idx), labels, np.asarray(palette, dtype=np.uint8)[labels]


# The 6 faces of a unit cube as 4 corner sign vectors each, counter-clockwise seen from outside.
_FACES = np.array([
    [[-1, -1, -1], [-1, -1, 1], [-1, 1, 1], [-1, 1, -1]],   # -x
    [[1, -1, -1], [1, 1, -1], [1, 1, 1], [1, -1, 1]],       # +x
    [[-1, -1, -1], [1, -1, -1], [1, -1, 1], [-1, -1, 1]],   # -y
    [[-1, 1, -1], [-1, 1, 1], [1, 1, 1], [1, 1, -1]],       # +y
    [[-1, -1, -1], [-1, 1, -1], [1, 1, -1], [1, -1, -1]],   # -z
    [[-1, -1, 1], [1, -1, 1], [1, 1, 1], [-1, 1, 1]],       # +z
], dtype=np.float64)                                          # (6, 4, 3)


@dataclass
class CubeMesh:
    """Triangle mesh of axis-aligned cube faces: 4 vertices per face (for flat per-face colour) and 2
    triangles per face; all 6 faces of N cubes give 24N vertices and 12N triangles.

    Attributes:
        vertices: (4M, 3) float64 for M faces.  triangles: (2M, 3) int64 (outward counter-clockwise).
        colors: (4M, 3) uint8, the cube colour times the face's :data:`FACE_SHADE` when shaded.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    colors: np.ndarray


def exposed_faces(keep: np.ndarray) -> np.ndarray:
    """(X, Y, Z) bool drawn voxels → (N, 6) bool: face (−x, +x, −y, +y, −z, +z) of each drawn voxel (C
    order, like :func:`voxel_centers`) is exposed, i.e. its neighbour is not drawn or outside the grid.
    Hidden faces are never visible, so dropping them shrinks meshes ~5× on real scenes."""
    keep = np.asarray(keep, bool)
    pad = np.pad(keep, 1, constant_values=False)
    core = (slice(1, -1),) * 3
    out = []
    for axis in range(3):
        for step in (-1, 1):
            sl = list(core)
            sl[axis] = slice(1 + step, pad.shape[axis] - 1 + step)
            out.append(~pad[tuple(sl)][keep])
    return np.stack(out, axis=1)


def cube_mesh(centers: np.ndarray, size: float, colors: np.ndarray | None = None, shade: bool = True,
              fill: float = 1.0, faces: np.ndarray | None = None) -> CubeMesh:
    """Vectorised cubes of edge ``size·fill`` centred at ``centers`` (N, 3); ``colors`` (N, 3) uint8;
    ``faces`` (N, 6) bool keeps only those faces (e.g. :func:`exposed_faces`), all faces when None."""
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 3)
    n = len(centers)
    if colors is None:
        colors = np.full((n, 3), 160, dtype=np.uint8)
    colors = np.asarray(colors).reshape(n, 3)
    if faces is None:
        faces = np.ones((n, 6), dtype=bool)
    cube, face = np.nonzero(np.asarray(faces, bool).reshape(n, 6))                   # (M,), (M,)
    half = 0.5 * size * fill
    verts = centers[cube][:, None, :] + half * _FACES[face]                          # (M, 4, 3)
    quad = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int64)                          # 2 triangles per face
    tris = (4 * np.arange(len(face), dtype=np.int64)[:, None, None] + quad[None]).reshape(-1, 3)  # (2M, 3)
    factor = FACE_SHADE[face] if shade else np.ones(len(face))
    fc = np.round(colors[cube].astype(np.float64) * factor[:, None]).astype(np.uint8)    # (M, 3)
    return CubeMesh(verts.reshape(-1, 3), tris, np.repeat(fc, 4, axis=0))


def error_labels(pred: np.ndarray, gt: np.ndarray, free_id: int = FREE_ID, mask: np.ndarray | None = None):
    """Compare a predicted and a ground-truth label grid (same shape).

    Returns:
        codes: uint8 grid of ``ERR_*`` codes (draw with :data:`ERROR_PALETTE`, hide ``ERR_FREE``);
        tp, fp, fn: bool grids — occupied in both (any class), predicted-only, GT-only. Voxels outside
        ``mask`` (when given) are ``ERR_FREE`` and in none of the three.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"error_labels: pred {pred.shape} and gt {gt.shape} differ")
    po, go = pred != free_id, gt != free_id
    valid = np.ones(gt.shape, bool) if mask is None else np.asarray(mask, bool)
    tp, fp, fn = po & go & valid, po & ~go & valid, ~po & go & valid
    codes = np.full(gt.shape, ERR_FREE, dtype=np.uint8)
    codes[tp] = ERR_TP
    codes[tp & (pred != gt)] = ERR_WRONG
    codes[fp], codes[fn] = ERR_FP, ERR_FN
    return codes, tp, fp, fn


def ego_box(ego: EgoVehicle = NUSCENES_EGO, ground_z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Ego marker: (8, 3) corners of the car's body box where it really is in the ego frame — centred
    ``ego.center_ahead`` (1.3 m for nuScenes) ahead of the ego origin (the rear axle), from ``ground_z``
    up — and (12, 2) edge index pairs (a wire box for an Open3D ``LineSet``)."""
    corners = ego.body_corners(ground_z)
    bits = (np.arange(8)[:, None] >> np.array([2, 1, 0])) & 1       # corner i's (x, y, z) side, as in body_corners
    edges = [(i, j) for i in range(8) for j in range(i + 1, 8) if np.count_nonzero(bits[i] != bits[j]) == 1]
    return corners, np.array(edges, dtype=np.int64)


@dataclass(frozen=True)
class CameraPreset:
    """A look-at camera: eye, center (target), up vector (metres, ego frame) and vertical field of view."""

    name: str
    eye: tuple[float, float, float]
    center: tuple[float, float, float]
    up: tuple[float, float, float]
    fov_deg: float = 60.0

    def extrinsic(self) -> np.ndarray:
        """(4, 4) world→camera matrix in the OpenCV convention (x right, y down, z forward)."""
        eye, c = np.asarray(self.eye, float), np.asarray(self.center, float)
        f = c - eye
        f /= np.linalg.norm(f)
        r = np.cross(f, np.asarray(self.up, float))
        if np.linalg.norm(r) < 1e-9:
            raise ValueError(f"camera {self.name!r}: up vector is parallel to the viewing direction")
        r /= np.linalg.norm(r)
        d = np.cross(f, r)                 # image "down"
        R = np.stack([r, d, f])
        E = np.eye(4)
        E[:3, :3], E[:3, 3] = R, -R @ eye
        return E


def camera_preset(name: str, grid: GridSpec) -> CameraPreset:
    """``bev``: straight down from above, x (forward) pointing up in the image, y (left) to the left;
    ``chase``: behind and above the ego, looking forward. Distances scale with the grid's extent."""
    half = 0.5 * max(grid.hi[0] - grid.lo[0], grid.hi[1] - grid.lo[1])
    zc = 0.5 * (grid.lo[2] + grid.hi[2])
    if name == "bev":
        fov = 40.0
        height = half / np.tan(np.radians(fov / 2)) * 1.02 + grid.hi[2]
        return CameraPreset("bev", (0.0, 0.0, height), (0.0, 0.0, zc), (1.0, 0.0, 0.0), fov)
    if name == "chase":
        return CameraPreset("chase", (-0.75 * half, 0.0, 0.75 * half), (0.25 * half, 0.0, zc), (0.0, 0.0, 1.0), 60.0)
    raise ValueError(f"unknown camera preset {name!r}: use 'bev' or 'chase'")


def legend_entries(*grids: np.ndarray, names=OCC3D_CLASSES, palette: np.ndarray = PALETTE,
                   hide=(FREE_ID,)) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(id, name, rgb) for every label present in any of ``grids``, minus ``hide``, sorted by id."""
    present = set()
    for g in grids:
        present |= set(np.unique(np.asarray(g)).tolist())
    return [(int(i), names[i], tuple(int(v) for v in palette[i])) for i in sorted(present - set(hide))]
