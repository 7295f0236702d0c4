"""Ego-motion extrapolation (closed-form arcs and lines) and the cv-warp baseline built on it."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.warp_speed import warp_frame_loop  # noqa: E402
from occ_mfd.data.records import OccBatch  # noqa: E402
from occ_mfd.ego_motion import extrapolate_poses, planar_motion, planar_pose  # noqa: E402
from occ_mfd.eval.baselines import CVWarp, cv_warp, warp_last  # noqa: E402
from occ_mfd.grid import FREE_ID, GridSpec  # noqa: E402


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


# --------------------------------------------------------------------------- warp_frame against the loop version


# The earlier loop version, kept once in the benchmark that times it against the new one.
reference_warp_frame = warp_frame_loop


#: Non-cubic grids: 0.5 m voxels (dyadic, so the float32 centres are exact and half-voxel shifts land *exactly*
#: on voxel faces) and Occ3D-like 0.4 m voxels (centres one float32 rounding off a face).
WARP_GRIDS = [GridSpec((-5.0, -3.0, -1.0), (6.0, 3.0, 1.5), 0.5), GridSpec((-4.0, -2.4, -0.8), (4.8, 2.4, 1.2), 0.4)]


def random_frames(grid, B, dtype, g):
    X, Y, Z = grid.shape
    occ = torch.randint(0, 17, (B, X, Y, Z), generator=g)
    return torch.where(torch.rand(occ.shape, generator=g) < 0.5, torch.full_like(occ, FREE_ID), occ).to(dtype)


def put_centres_on_faces(poses, grid, g, axes=(0, 1)):
    """Set the translation of each (…, 4, 4) pose so that one random voxel centre lands on a voxel face along
    each of ``axes`` *as floor() sees it*: t_i is the smallest float64 with floor((s + t_i - lo_i) / size) = m,
    s being the centre's rotated coordinate summed in the reference's order. One ulp less in s (another
    summation order, a fused multiply-add, (q - lo) / size reassociated) and that voxel can read the one below."""
    centres = torch.from_numpy(grid.centers()).double()
    flat = poses.view(-1, 4, 4)
    for pose in flat:
        v = centres[tuple(int(torch.randint(0, n, (1,), generator=g)) for n in grid.shape)].tolist()
        R = pose[:3, :3].tolist()
        for i in axes:
            s = (v[0] * R[i][0] + v[1] * R[i][1]) + v[2] * R[i][2]
            m = int(torch.randint(1, grid.shape[i], (1,), generator=g))
            below, t = [grid.lo[i] + m * grid.voxel_size - s + d for d in (-grid.voxel_size, grid.voxel_size)]
            while (mid := (below + t) / 2) not in (below, t):       # bisect down to two neighbouring floats
                if math.floor((s + mid - grid.lo[i]) / grid.voxel_size) >= m:
                    t = mid
                else:
                    below = mid
            pose[i, 3] = t
    return poses


def planar_warp_poses(grid, g):
    """(2, 3, 4, 4) planar poses per kind: translations by whole and half voxels (centres onto faces), exact
    quarter / half turns, float yaws (cos(π/2) ≠ 0), random yaws with off-grid shifts, and both combined."""
    h = grid.voxel_size / 2
    def shift(n):
        return (torch.randint(-6, 7, (n,), generator=g) * h).double()
    def pose(x, y, yaw):
        return planar_pose(torch.stack([x, y, yaw], -1).double()).reshape(2, 3, 4, 4)
    n = 6
    quarter = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.0]) * (math.pi / 2)
    kinds = {
        "half-voxel shifts": pose(shift(n), shift(n), torch.zeros(n)),
        "float quarter turns + half-voxel shifts": pose(shift(n), shift(n), quarter),
        "random yaw + half-voxel shifts": pose(shift(n), shift(n), (torch.rand(n, generator=g) - 0.5) * 2 * math.pi),
        "random yaw + random shifts": pose(torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 3,
                                           (torch.rand(n, generator=g) - 0.5) * 2 * math.pi),
    }
    exact = pose(shift(n), shift(n), torch.zeros(n))                  # exact quarter turns: R has only 0 and ±1
    turns = torch.randint(0, 4, (n,), generator=g).tolist()
    for m, k in enumerate(turns):
        c, s = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)][k]
        exact.view(n, 4, 4)[m, :2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    kinds["exact quarter turns + half-voxel shifts"] = exact
    random_yaw = pose(torch.zeros(n), torch.zeros(n), (torch.rand(n, generator=g) - 0.5) * 2 * math.pi)
    kinds["random yaw, a centre on a face"] = put_centres_on_faces(random_yaw, grid, g)
    kinds["float quarter turns, a centre on a face"] = put_centres_on_faces(pose(*[torch.zeros(n)] * 2, quarter),
                                                                            grid, g)
    return kinds


@pytest.mark.parametrize("grid", WARP_GRIDS, ids=["0.5m", "0.4m"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_warp_frame_equals_the_loop_reference_bit_for_bit_on_planar_poses(grid, dtype):
    from occ_mfd.ego_motion import warp_frame
    g = torch.Generator().manual_seed(3)
    frame = random_frames(grid, 2, dtype, g)
    for kind, poses in planar_warp_poses(grid, g).items():
        for p in (poses, poses.float()):                                  # float32 poses are promoted the same way
            out = warp_frame(frame, p, grid)
            assert out.shape == (2, 3, *grid.shape) and out.dtype == dtype
            assert torch.equal(out, reference_warp_frame(frame, p, grid)), kind
    assert torch.equal(warp_frame(frame, poses, grid, free_id=0), reference_warp_frame(frame, poses, grid, 0))


def test_warp_frame_equals_the_loop_reference_on_3d_poses():
    """Full 3-D rotations (every coordinate depends on every axis), half-voxel shifts, shifts that put a centre
    on a face; plus the identity."""
    from occ_mfd.ego_motion import warp_frame
    g = torch.Generator().manual_seed(4)
    for grid in WARP_GRIDS:
        frame = random_frames(grid, 2, torch.int64, g)
        Q, _ = torch.linalg.qr(torch.randn(6, 3, 3, generator=g, dtype=torch.float64))
        poses = torch.eye(4, dtype=torch.float64).repeat(6, 1, 1)
        poses[:, :3, :3] = Q
        poses[:, :3, 3] = torch.randint(-4, 5, (6, 3), generator=g) * (grid.voxel_size / 2)
        poses[0] = torch.eye(4)
        poses = poses.reshape(2, 3, 4, 4)
        out = warp_frame(frame, poses, grid)
        assert torch.equal(out, reference_warp_frame(frame, poses, grid))
        assert torch.equal(out[0, 0], frame[0])                           # the identity pose copies the frame
        on_faces = put_centres_on_faces(poses.clone(), grid, g, axes=(0, 1, 2))
        assert torch.equal(warp_frame(frame, on_faces, grid), reference_warp_frame(frame, on_faces, grid))


def test_warp_frame_half_voxel_shifts_do_put_centres_on_voxel_faces():
    """The 0.5 m case above really tests the face rule: a +½-voxel shift puts q exactly on a face (floor picks
    the upper voxel), while −½ voxel puts it on the face below."""
    from occ_mfd.ego_motion import warp_frame
    grid = WARP_GRIDS[0]
    c = torch.from_numpy(grid.centers()).double()
    assert ((c[..., 0] + 0.25 - grid.lo[0]) / grid.voxel_size).frac().eq(0).all()
    frame = random_frames(grid, 1, torch.int64, torch.Generator().manual_seed(5))
    for x, moved in ((0.25, 1), (-0.25, 0)):
        pose = planar_pose(torch.tensor([[[x, 0.0, 0.0]]], dtype=torch.float64))
        out = warp_frame(frame, pose, grid)[0, 0]
        assert torch.equal(out, reference_warp_frame(frame, pose, grid)[0, 0])
        if moved:
            assert torch.equal(out[:-1], frame[0, 1:]) and (out[-1] == FREE_ID).all()
        else:
            assert torch.equal(out, frame[0])


def test_warp_frame_handles_no_frames():
    from occ_mfd.ego_motion import warp_frame
    grid = WARP_GRIDS[1]
    frame = random_frames(grid, 2, torch.uint8, torch.Generator().manual_seed(6))
    out = warp_frame(frame, torch.zeros(2, 0, 4, 4), grid)
    assert out.shape == (2, 0, *grid.shape) and out.dtype == torch.uint8


def test_warp_frame_gives_free_for_non_finite_and_far_poses():
    """NaN / inf / 1e300 entries: every voxel whose source coordinate is not a finite in-grid point is free."""
    from occ_mfd.ego_motion import warp_frame
    grid = WARP_GRIDS[1]
    frame = random_frames(grid, 1, torch.uint8, torch.Generator().manual_seed(7))
    poses = torch.eye(4, dtype=torch.float64).repeat(1, 4, 1, 1)
    poses[0, 0, 0, 3] = math.nan
    poses[0, 1, 1, 3] = math.inf
    poses[0, 2, 2, 3] = -1e300
    poses[0, 3, 0, 0] = math.nan                                          # x depends on a NaN rotation entry
    out = warp_frame(frame, poses, grid)
    assert (out == FREE_ID).all()
