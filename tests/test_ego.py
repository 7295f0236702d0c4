"""The one ego-vehicle definition: its numbers, and that the pipeline, the simulator and the viewer use it."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from occ_mfd.data.occupancy.points import EGO_BOX, ego_mask
from occ_mfd.data.synthetic.simulate import lidar_calibration
from occ_mfd.ego import NUSCENES_EGO, EgoPart, box_contains
from occ_mfd.viz.geometry import ego_box

# Hand-computed body box of the Zoe: 4.08 × 1.73 × 1.56 m, centred 1.3 m ahead of the rear axle.
BODY_LO = (1.3 - 2.04, -0.865, 0.0)
BODY_HI = (1.3 + 2.04, 0.865, 1.56)


def _inside(outer, lo, hi) -> bool:
    return all(o0 <= a and b <= o1 for o0, o1, a, b in zip(outer[0], outer[1], lo, hi))


def test_pipeline_and_simulator_numbers_are_unchanged():
    # Bit-identical to the values every label file and synthetic world so far was made with.
    assert EGO_BOX == ((-1.2, -1.1, -0.5), (3.6, 1.1, 2.2))
    assert NUSCENES_EGO.removal_box is EGO_BOX
    assert NUSCENES_EGO.wlh.tobytes() == np.array([1.73, 4.08, 1.56]).tobytes()
    assert NUSCENES_EGO.center_ahead == 1.3
    centres, wlh = NUSCENES_EGO.occluder_arrays()
    assert centres.tobytes() == np.array([[0.9, 0.0, 0.72], [1.3, 0.0, 0.5]]).tobytes()
    assert wlh.tobytes() == np.array([[1.5, 2.4, 1.44], [1.73, 4.08, 1.0]]).tobytes()


def test_body_box_is_where_the_car_is():
    lo, hi = NUSCENES_EGO.body.bounds()
    np.testing.assert_allclose(lo, BODY_LO, atol=1e-12)
    np.testing.assert_allclose(hi, BODY_HI, atol=1e-12)
    assert lo[0] < 0 < hi[0] and hi[0] - 0 > 0 - lo[0] + 2.0   # mostly ahead of the rear axle


def test_removal_box_contains_body_and_occluder_with_margins():
    assert _inside(EGO_BOX, BODY_LO, BODY_HI)
    for c, (w, l, h) in zip(*NUSCENES_EGO.occluder_arrays()):
        lo, hi = c - [l / 2, w / 2, h / 2], c + [l / 2, w / 2, h / 2]
        assert _inside(EGO_BOX, lo, hi) and _inside((BODY_LO, BODY_HI), lo, hi)
    (behind, right, below), (ahead, left, above) = NUSCENES_EGO.removal_margins()
    np.testing.assert_allclose([behind, ahead, right, left, below, above], [0.46, 0.26, 0.235, 0.235, 0.5, 0.64])


def test_inconsistent_definitions_are_refused():
    with pytest.raises(ValueError, match="must contain the body"):
        dataclasses.replace(NUSCENES_EGO, removal_box=((-0.5, -1.1, -0.5), (3.6, 1.1, 2.2)))
    with pytest.raises(ValueError, match="must contain the body"):
        dataclasses.replace(NUSCENES_EGO, center_ahead=0.0)       # the old "centred at the origin" body
    with pytest.raises(ValueError, match="sticks out"):
        dataclasses.replace(NUSCENES_EGO, cabin=EgoPart((0.9, 0.0, 0.9), (1.5, 2.4, 1.44)))
    assert box_contains(((0, 0, 0), (1, 1, 1)), ((0, 0, 0), (1, 1, 1)))
    assert not box_contains(((0, 0, 0), (1, 1, 1)), ((0, 0, 0), (1, 1.01, 1)))


@pytest.mark.parametrize("sensor2ego", [np.eye(4), lidar_calibration()], ids=["ego", "lidar_top"])
def test_ego_mask_removes_the_car_and_keeps_what_is_outside(sensor2ego):
    ego_pts = np.array([
        [3.5, 0.0, 1.0], [3.7, 0.0, 1.0],      # front: 3.6
        [-1.1, 0.0, 1.0], [-1.3, 0.0, 1.0],    # back: -1.2
        [1.0, 1.05, 1.0], [1.0, 1.15, 1.0],    # left: 1.1
        [1.0, -1.05, 1.0], [1.0, -1.15, 1.0],  # right: -1.1
        [1.0, 0.0, 2.1], [1.0, 0.0, 2.3],      # top: 2.2
        [1.0, 0.0, -0.4], [1.0, 0.0, -0.6],    # bottom: -0.5
    ])
    expected = np.array([True, False] * 6)
    # Points given in the sensor frame map to ``ego_pts`` through ``sensor2ego``.
    R, t = sensor2ego[:3, :3], sensor2ego[:3, 3]
    sensor_pts = (ego_pts - t) @ R
    np.testing.assert_array_equal(ego_mask(sensor_pts, sensor2ego), expected)


def test_viewer_draws_the_body_box_where_the_car_is():
    corners, edges = ego_box()
    expected = {(x, y, z) for x in (1.3 - 2.04, 1.3 + 2.04) for y in (-0.865, 0.865) for z in (0.0, 1.56)}
    assert len(corners) == 8
    for c in corners:
        assert min(np.abs(np.subtract(sorted(expected), c)).max(axis=1)) < 1e-12
    np.testing.assert_allclose(corners.mean(0), [1.3, 0.0, 0.78], atol=1e-12)   # centre 1.3 m ahead
    corners_up, _ = ego_box(ground_z=-0.3)
    np.testing.assert_allclose(corners_up, corners + [0.0, 0.0, -0.3], atol=1e-12)
    # 12 edges, each along one axis, of the body's length, width or height.
    d = corners[edges[:, 1]] - corners[edges[:, 0]]
    assert len(edges) == 12 and np.all(np.count_nonzero(np.abs(d) > 1e-9, axis=1) == 1)
    assert sorted(np.round(np.abs(d).sum(1), 6)) == sorted([1.56] * 4 + [1.73] * 4 + [4.08] * 4)
