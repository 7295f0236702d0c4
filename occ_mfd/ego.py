"""The ego vehicle: the one definition of nuScenes' data-collection car (a Renault Zoe) for the package.

**Frame** (every number below): the nuScenes *ego frame* — origin on the ground under the middle of the
rear axle, x forward, y left, z up from the ground, metres. nuScenes' ego poses are planar (their z is
0), so z = 0 is the road under the car; LIDAR_TOP sits at about (0.94, 0, 1.84) in this frame.

Users: the occupancy pipeline drops LiDAR returns inside :attr:`EgoVehicle.removal_box`
(:mod:`occ_mfd.data.occupancy.points`), the synthetic world simulates the car's footprint and its
self-occlusion (:mod:`occ_mfd.data.synthetic.simulate`), and the viewer draws :meth:`EgoVehicle.body_corners`
(:mod:`occ_mfd.viz.geometry`). Changing :data:`NUSCENES_EGO` changes generated labels and synthetic
data: do it only with a data migration.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: An axis-aligned box as ((x_min, y_min, z_min), (x_max, y_max, z_max)), ego frame.
Bounds = tuple[tuple[float, float, float], tuple[float, float, float]]


def box_contains(outer: Bounds, inner: Bounds) -> bool:
    """True when the axis-aligned box ``inner`` lies inside ``outer`` (faces may touch)."""
    return all(o0 <= i0 and i1 <= o1 for o0, o1, i0, i1 in zip(outer[0], outer[1], inner[0], inner[1]))


@dataclass(frozen=True)
class EgoPart:
    """An upright box of the car, axis-aligned in the ego frame.

    center: (x, y, z) of the box centre; wlh: (width along y, length along x, height along z) — the
    nuScenes size order, as the synthetic world's ``make_boxes`` takes it.
    """

    center: tuple[float, float, float]
    wlh: tuple[float, float, float]

    def bounds(self) -> Bounds:
        (x, y, z), (w, l, h) = self.center, self.wlh
        return (x - l / 2, y - w / 2, z - h / 2), (x + l / 2, y + w / 2, z + h / 2)


@dataclass(frozen=True)
class EgoVehicle:
    """The ego car in its own frame (see the module docstring: x forward from the rear axle, y left, z up
    from the ground).

    Attributes:
        length, width, height: the body box (m), without mirrors.
        center_ahead: how far the body box's centre lies ahead of the rear axle (the ego origin), m.
        removal_box: LiDAR returns inside this box are the car itself and are dropped; it must contain
            the body box (checked) and adds the mirrors and margins (see :data:`NUSCENES_EGO`).
        cabin: the upper part of the body as the simulated LiDAR sees it (see :attr:`occluder`).
        lower_body_height: height of the full-footprint lower body of :attr:`occluder`, m.
    """

    length: float
    width: float
    height: float
    center_ahead: float
    removal_box: Bounds
    cabin: EgoPart
    lower_body_height: float

    def __post_init__(self):
        if not min(self.length, self.width, self.height, self.lower_body_height) > 0:
            raise ValueError(f"EgoVehicle: sizes must be positive, got {self}")
        lo, hi = self.removal_box
        if not all(a < b for a, b in zip(lo, hi)):
            raise ValueError(f"EgoVehicle: removal_box {self.removal_box} needs min < max per axis")
        if not box_contains(self.removal_box, self.body.bounds()):
            raise ValueError(f"EgoVehicle: removal_box {self.removal_box} must contain the body "
                             f"{self.body.bounds()}")
        for part in self.occluder:
            if not box_contains(self.body.bounds(), part.bounds()):
                raise ValueError(f"EgoVehicle: occluder part {part} sticks out of the body {self.body.bounds()}")

    @property
    def wlh(self) -> np.ndarray:
        """(3,) float64 (width, length, height) of the body, nuScenes order."""
        return np.array([self.width, self.length, self.height])

    @property
    def body(self) -> EgoPart:
        """The body box: centred ``center_ahead`` ahead of the rear axle, on the ground (z ∈ [0, height])."""
        return EgoPart((self.center_ahead, 0.0, self.height / 2), (self.width, self.length, self.height))

    @property
    def occluder(self) -> tuple[EgoPart, EgoPart]:
        """The car as the synthetic LiDAR sees it: :attr:`cabin` on a lower body with the full footprint
        and ``lower_body_height``. Both lie inside the body box (checked)."""
        lower = EgoPart((self.center_ahead, 0.0, self.lower_body_height / 2),
                        (self.width, self.length, self.lower_body_height))
        return self.cabin, lower

    def occluder_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """:attr:`occluder` as (K, 3) float64 centres and (K, 3) float64 (w, l, h) sizes, ego frame."""
        parts = self.occluder
        return np.array([p.center for p in parts]), np.array([p.wlh for p in parts])

    def body_corners(self, ground_z: float = 0.0) -> np.ndarray:
        """(8, 3) float64 corners of the body box with its bottom at ``ground_z``; corner ``i`` has sign
        bits (x, y, z) = (i >> 2, i >> 1, i) & 1 (0: min side, 1: max side)."""
        (x0, y0, _), (x1, y1, _) = self.body.bounds()
        return np.array([[x, y, ground_z + z] for x in (x0, x1) for y in (y0, y1) for z in (0.0, self.height)])

    def removal_margins(self) -> Bounds:
        """How far :attr:`removal_box` reaches beyond the body: ((behind, right, below), (ahead, left, above))."""
        (b0, b1), (r0, r1) = self.body.bounds(), self.removal_box
        return tuple(a - b for a, b in zip(b0, r0)), tuple(b - a for a, b in zip(b1, r1))


#: nuScenes' ego vehicle, a Renault Zoe. Why each number:
#:
#: - body 4.08 × 1.73 × 1.56 m (length × width × height): the Zoe's published size (4.084 × 1.730 ×
#:   1.562 m, width without mirrors), rounded to centimetres.
#: - ``center_ahead`` 1.3 m: the body taken as centred between the axles (about half the Zoe's ~2.59 m
#:   wheelbase), so it spans x ∈ [-0.74, 3.34] m.
#: - ``removal_box`` x ∈ [-1.2, 3.6], y ∈ [-1.1, 1.1], z ∈ [-0.5, 2.2] m: the body plus 0.46 m behind,
#:   0.26 m ahead, 0.235 m per side (the mirrors stick out about 0.1 m per side; the rest is margin),
#:   0.5 m below the ground (margin for returns off the wheels and underbody with range noise, and for
#:   a car pitched on its suspension or on a slope) and 0.64 m above the roof (the sensor rack with
#:   LIDAR_TOP at 1.84 m, and zero-range returns at the sensor). Every label file so far was generated
#:   with these numbers: keep them (the body must stay inside, which ``EgoVehicle`` checks).
#: - ``cabin`` (centre 0.9 m ahead of the axle, 1.5 m wide, 2.4 m long, 1.44 m high) on a 1.0 m high
#:   full-footprint lower body: the car as the synthetic LiDAR sees it, chosen so the simulated body
#:   shadows the lowest rings near the car as in real nuScenes sweeps (a simulator shape, not measured).
NUSCENES_EGO = EgoVehicle(
    length=4.08, width=1.73, height=1.56, center_ahead=1.3,
    removal_box=((-1.2, -1.1, -0.5), (3.6, 1.1, 2.2)),
    cabin=EgoPart(center=(0.9, 0.0, 0.72), wlh=(1.5, 2.4, 1.44)),
    lower_body_height=1.0,
)
