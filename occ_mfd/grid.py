"""The voxel grid, the Occ3D class table and the nuScenes-lidarseg → Occ3D mapping.

Every other module takes these from here; nothing else defines a grid, a class list, a colour or
the free id. See docs/design.md, "Fixed conventions".
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridSpec:
    """An axis-aligned voxel grid in an ego frame, axis order (x, y, z).

    Voxel ``i`` along an axis covers ``[lo + i·size, lo + (i+1)·size)``; the array shape is
    ``round((hi - lo) / size)`` per axis. The default is Occ3D-nuScenes: 200 × 200 × 16 voxels of 0.4 m.
    """

    lo: tuple[float, float, float] = (-40.0, -40.0, -1.0)
    hi: tuple[float, float, float] = (40.0, 40.0, 5.4)
    voxel_size: float = 0.4

    def __post_init__(self):
        object.__setattr__(self, "lo", tuple(float(v) for v in self.lo))
        object.__setattr__(self, "hi", tuple(float(v) for v in self.hi))
        object.__setattr__(self, "voxel_size", float(self.voxel_size))
        if len(self.lo) != 3 or len(self.hi) != 3:
            raise ValueError(f"GridSpec: lo and hi need 3 values each, got {self.lo} and {self.hi}")
        if not self.voxel_size > 0:
            raise ValueError(f"GridSpec: voxel_size must be positive, got {self.voxel_size}")
        for axis, (a, b) in enumerate(zip(self.lo, self.hi)):
            n = (b - a) / self.voxel_size
            if n < 1 or abs(n - round(n)) > 1e-6:
                raise ValueError(
                    f"GridSpec: axis {'xyz'[axis]} range [{a}, {b}] is not a positive whole number "
                    f"of {self.voxel_size} m voxels ({n:.4f})")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(X, Y, Z) voxel counts."""
        return tuple(int(round((b - a) / self.voxel_size)) for a, b in zip(self.lo, self.hi))

    @property
    def num_voxels(self) -> int:
        return math.prod(self.shape)

    def point_to_index(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map metric points to voxel indices.

        Args:
            points: (N, ≥3) array; only the first three columns (x, y, z) are used.
        Returns:
            idx: (N, 3) int64 voxel indices (meaningless where ``inside`` is False);
            inside: (N,) bool, True where the point lies in the grid.
        """
        p = np.asarray(points, dtype=np.float64)[:, :3]
        idx = np.floor((p - np.asarray(self.lo)) / self.voxel_size).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
        return idx, inside

    def index_to_center(self, idx: np.ndarray) -> np.ndarray:
        """(N, 3) integer voxel indices → (N, 3) float64 metric voxel centres."""
        return np.asarray(self.lo) + (np.asarray(idx, dtype=np.float64) + 0.5) * self.voxel_size

    def centers(self) -> np.ndarray:
        """(X, Y, Z, 3) float32 centres of every voxel."""
        axes = [self.lo[a] + (np.arange(n) + 0.5) * self.voxel_size for a, n in enumerate(self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)

    def pooled(self, factor: int) -> "GridSpec":
        """The same range with voxels ``factor`` times larger (e.g. 2: 200×200×16 → 100×100×8)."""
        return GridSpec(self.lo, self.hi, self.voxel_size * factor)

    def to_dict(self) -> dict:
        return {"lo": list(self.lo), "hi": list(self.hi), "voxel_size": self.voxel_size,
                "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "GridSpec":
        g = cls(tuple(d["lo"]), tuple(d["hi"]), d["voxel_size"])
        if "shape" in d and list(d["shape"]) != list(g.shape):
            raise ValueError(f"GridSpec: stored shape {d['shape']} disagrees with range/voxel size {g.shape}")
        return g

    def check_same(self, other: "GridSpec", where: str) -> None:
        """Raise a clear error if ``other`` differs from this grid; ``where`` names the file or object."""
        if not (np.allclose(self.lo, other.lo) and np.allclose(self.hi, other.hi)
                and math.isclose(self.voxel_size, other.voxel_size)):
            raise ValueError(
                f"{where}: grid mismatch: expected {json.dumps(self.to_dict())}, "
                f"found {json.dumps(other.to_dict())}. Re-prepare the data or use a matching config.")


OCC3D_GRID = GridSpec()

# ------------------------------------------------------------------------------------------ classes

#: Occ3D-nuScenes class names by id; id 17 is free space.
OCC3D_CLASSES: tuple[str, ...] = (
    "others", "barrier", "bicycle", "bus", "car", "construction_vehicle", "motorcycle", "pedestrian",
    "traffic_cone", "trailer", "truck", "driveable_surface", "other_flat", "sidewalk", "terrain",
    "manmade", "vegetation", "free",
)
NUM_CLASSES = len(OCC3D_CLASSES)  # 18, free included
FREE_ID = 17
NUM_SEMANTIC = FREE_ID            # 17 occupied classes, 0..16: the mIoU class set
#: Occupied classes that move (the "dynamic" classes used for trail checks and box labels).
DYNAMIC_CLASSES: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 9, 10)

#: Fixed RGB palette (uint8) by Occ3D id, close to the one used by Occ3D/OccWorld renderings.
PALETTE = np.array([
    [0, 0, 0],        # others
    [255, 120, 50],   # barrier
    [255, 192, 203],  # bicycle
    [255, 255, 0],    # bus
    [0, 150, 245],    # car
    [0, 255, 255],    # construction_vehicle
    [200, 180, 0],    # motorcycle
    [255, 0, 0],      # pedestrian
    [255, 240, 150],  # traffic_cone
    [135, 60, 0],     # trailer
    [160, 32, 240],   # truck
    [255, 0, 255],    # driveable_surface
    [139, 137, 137],  # other_flat
    [75, 0, 75],      # sidewalk
    [150, 240, 80],   # terrain
    [230, 230, 250],  # manmade
    [0, 175, 0],      # vegetation
    [255, 255, 255],  # free (never drawn)
], dtype=np.uint8)

# ------------------------------------------------------------------------- nuScenes-lidarseg mapping

#: The 32 nuScenes-lidarseg classes by their ``category.json`` index.
LIDARSEG_CLASSES: tuple[str, ...] = (
    "noise", "animal", "human.pedestrian.adult", "human.pedestrian.child",
    "human.pedestrian.construction_worker", "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer", "human.pedestrian.stroller", "human.pedestrian.wheelchair",
    "movable_object.barrier", "movable_object.debris", "movable_object.pushable_pullable",
    "movable_object.trafficcone", "static_object.bicycle_rack", "vehicle.bicycle",
    "vehicle.bus.bendy", "vehicle.bus.rigid", "vehicle.car", "vehicle.construction",
    "vehicle.emergency.ambulance", "vehicle.emergency.police", "vehicle.motorcycle",
    "vehicle.trailer", "vehicle.truck", "flat.driveable_surface", "flat.other", "flat.sidewalk",
    "flat.terrain", "static.manmade", "static.other", "static.vegetation", "vehicle.ego",
)
#: Label value for points that carry no geometry label (noise returns, the ego vehicle): dropped.
IGNORE = 255

#: Seconds between keyframes (nuScenes samples, 2 Hz): the spacing of every history and future frame.
KEYFRAME_DT_S = 0.5

_FINE_TO_OCC3D_NAME = {
    # The nuScenes-lidarseg challenge's fine → coarse table (devkit LidarsegClassMapper), with its
    # "ignore" class becoming Occ3D's "others" (id 0), as Occ3D does. Noise and the ego vehicle are
    # not scene geometry and are dropped.
    "noise": None, "vehicle.ego": None,
    "animal": "others", "human.pedestrian.personal_mobility": "others",
    "human.pedestrian.stroller": "others", "human.pedestrian.wheelchair": "others",
    "movable_object.debris": "others", "movable_object.pushable_pullable": "others",
    "static_object.bicycle_rack": "others", "vehicle.emergency.ambulance": "others",
    "vehicle.emergency.police": "others", "static.other": "others",
    "human.pedestrian.adult": "pedestrian", "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian", "human.pedestrian.police_officer": "pedestrian",
    "movable_object.barrier": "barrier", "movable_object.trafficcone": "traffic_cone",
    "vehicle.bicycle": "bicycle", "vehicle.bus.bendy": "bus", "vehicle.bus.rigid": "bus",
    "vehicle.car": "car", "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle", "vehicle.trailer": "trailer", "vehicle.truck": "truck",
    "flat.driveable_surface": "driveable_surface", "flat.other": "other_flat",
    "flat.sidewalk": "sidewalk", "flat.terrain": "terrain", "static.manmade": "manmade",
    "static.vegetation": "vegetation",
}

#: (32,) uint8 lookup table: lidarseg index → Occ3D id, or IGNORE.
LIDARSEG_TO_OCC3D = np.array(
    [IGNORE if _FINE_TO_OCC3D_NAME[n] is None else OCC3D_CLASSES.index(_FINE_TO_OCC3D_NAME[n])
     for n in LIDARSEG_CLASSES], dtype=np.uint8)


def lidarseg_to_occ3d(labels: np.ndarray) -> np.ndarray:
    """Map nuScenes-lidarseg indices (any shape, 0..31) to Occ3D ids (uint8; IGNORE for dropped)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(LIDARSEG_CLASSES)):
        raise ValueError(f"lidarseg labels must lie in 0..31, found {labels.min()}..{labels.max()}")
    return LIDARSEG_TO_OCC3D[labels.astype(np.int64)]


def category_to_occ3d(category_name: str) -> int:
    """nuScenes annotation category (e.g. ``vehicle.car``) → Occ3D id; unknown names → others (0)."""
    occ = _FINE_TO_OCC3D_NAME.get(category_name)
    return OCC3D_CLASSES.index(occ) if occ is not None else 0
