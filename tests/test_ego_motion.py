"""Ego-motion extrapolation (closed-form arcs and lines) and the cv-warp baseline built on it."""
import math

import pytest
import torch

from occ_mfd.data.records import OccBatch
from occ_mfd.ego_motion import extrapolate_poses, planar_motion, planar_pose
from occ_mfd.eval.baselines import CVWarp, cv_warp, warp_last
from occ_mfd.grid import FREE_ID, GridSpec


def arc_poses(R: float, omega: float, ks) -> torch.Tensor:
    """(1, len(ks), 4, 4): an ego driving on a circle of radius R (centre (0, R)) turning omega per frame,
    frame k relative to the current frame (k = 0 is the identity). R = inf: a straight line, 1 m per frame."""
    rows = []
    for k in ks:
        if math.isinf(R):
            x, y, yaw = float(k), 0.0, 0.0
        else:
            x, y, yaw = R * math.sin(k * omega), R * (1 - math.cos(k * omega)), k * omega
        rows.append([x, y, yaw])
    return planar_pose(torch.tensor(rows, dtype=torch.float64))[None]


@pytest.mark.parametrize("R, omega", [(math.inf, 0.0), (20.0, 0.15), (8.0, -0.3), (50.0, 0.02)])
def test_extrapolation_continues_a_circular_arc_exactly(R, omega):
    past = arc_poses(R, omega, [-3, -2, -1, 0])
    expected = arc_poses(R, omega, [1, 2, 3, 4, 5, 6])
    out = extrapolate_poses(past, 6)
    assert out.shape == (1, 6, 4, 4)
    assert torch.allclose(out, expected, atol=1e-9)


def test_extrapolation_uses_only_the_last_step():
    """An accelerating ego: only the most recent step (here 2 m per frame) is extrapolated."""
    past = planar_pose(torch.tensor([[-3.5, 0, 0], [-3.0, 0, 0], [-2.0, 0, 0], [0, 0, 0]], dtype=torch.float64))[None]
    out = planar_motion(extrapolate_poses(past, 3))[0]
    assert torch.allclose(out[:, 0], torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64))
    assert torch.allclose(out[:, 1:], torch.zeros(3, 2, dtype=torch.float64))


def test_extrapolation_drops_height_pitch_and_roll():
    past = arc_poses(20.0, 0.1, [-1, 0]).clone()
    past[0, 0, 2, 3] = 0.7                                   # a height offset in the previous pose
    out = extrapolate_poses(past, 2)
    assert torch.allclose(out[..., 2, 3], torch.zeros(1, 2, dtype=torch.float64))
    assert torch.allclose(out[..., 2, :3], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(1, 2, 3))


def test_extrapolation_rejects_a_single_past_frame():
    with pytest.raises(ValueError, match="P >= 2"):
        extrapolate_poses(torch.eye(4)[None, None], 3)


G = GridSpec((-4.0, -4.0, -0.4), (4.0, 4.0, 0.4), 0.4)


def test_cv_warp_equals_warp_last_when_the_future_is_the_extrapolation_and_ignores_the_true_future():
    g = torch.Generator().manual_seed(0)
    X, Y, Z = G.shape
    occ = torch.randint(0, 17, (1, 4, X, Y, Z), generator=g)
    occ = torch.where(torch.rand(occ.shape, generator=g) < 0.6, torch.full_like(occ, FREE_ID), occ)
    ego = arc_poses(6.0, 0.2, range(-3, 4)).float()                  # P = 4 past, F = 3 future on the arc
    assert torch.equal(cv_warp(occ, ego, G), warp_last(occ, ego, G))
    other = ego.clone()
    other[:, 4:] = torch.eye(4)                                       # another true future: cv-warp unchanged
    assert torch.equal(cv_warp(occ, other, G), cv_warp(occ, ego, G))
    assert not torch.equal(warp_last(occ, other, G), warp_last(occ, ego, G))
    batch = OccBatch(past=occ, future=occ[:, 1:], ego=ego)
    assert torch.equal(CVWarp(G)(batch).classes, cv_warp(occ, ego, G))
