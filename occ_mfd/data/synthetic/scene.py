"""What the synthetic world simulator hands to the nuScenes-format writer (one driving scene).

The simulator (``simulate.py``) produces these records; ``nuscenes_writer.py`` turns them into the
nuScenes tables and files. Everything is in SI units; poses are 4×4 homogeneous float64 matrices.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SimLidarCalib:
    """LIDAR_TOP mounting: ``sensor2ego`` (4, 4). nuScenes mounts it ≈ (0.94, 0, 1.84) m, yawed −90°."""

    sensor2ego: np.ndarray


@dataclass
class SimSweep:
    """One LIDAR_TOP spin.

    Attributes:
        timestamp: microseconds (nuScenes convention).
        ego2global: (4, 4) true ego pose at ``timestamp`` (on hills with z, pitch and roll; the writer keeps
            only x, y and yaw, like nuScenes' 2-D localisation).
        points: (N, 5) float32 (x, y, z, intensity, ring) in the **sensor** frame.
        labels: (N,) uint8 nuScenes-lidarseg indices (0..31); written for keyframes only.
        is_key: whether this sweep is a keyframe (a nuScenes sample, 2 Hz).
    """

    timestamp: int
    ego2global: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    is_key: bool


@dataclass
class SimAgentState:
    """An agent's box at one keyframe, true global frame (the writer re-expresses it against the keyframe's
    written 2-D pose). ``yaw`` about +z; ``num_lidar_pts`` in the keyframe sweep."""

    center: np.ndarray  # (3,) box centre
    yaw: float
    velocity: np.ndarray  # (2,) m/s in the global xy plane
    num_lidar_pts: int
    moving: bool


@dataclass
class SimAgent:
    """One annotated object track.

    Attributes:
        category: nuScenes category name, e.g. ``vehicle.car`` or ``human.pedestrian.adult``.
        size: (3,) width, length, height in metres (nuScenes ``wlh`` order).
        states: keyframe index → state, for every keyframe where the agent exists.
    """

    category: str
    size: np.ndarray
    states: dict[int, SimAgentState] = field(default_factory=dict)


@dataclass
class SimScene:
    """A whole scene: its sweeps in time order (keyframes among them), agents, calibration, map."""

    name: str
    description: str
    location: str
    calib: SimLidarCalib
    sweeps: list[SimSweep]
    agents: list[SimAgent]
    split: str  # "train" or "val"
    map_png: np.ndarray | None = None  # (H, W) uint8 semantic map raster of the town, for maps/
    truth: list[np.ndarray] | None = None  # per keyframe (X, Y, Z) uint8 Occ3D semantics, if asked
    terrain: dict | None = None  # hills: ``Terrain.describe()`` (None: the flat world)

    @property
    def keyframes(self) -> list[SimSweep]:
        return [s for s in self.sweeps if s.is_key]
