"""The exact truth's rasteriser: a solid claims exactly the voxels it shares volume with (hand-computed cases).

Grid for the hand cases: x, y ∈ [−2, 2], z ∈ [−1, 2.2], 0.4 m voxels, so voxel i along x or y covers
[−2 + 0.4 i, −1.6 + 0.4 i] (x = 0 is the boundary between voxels 4 and 5) and layer k covers
[−1 + 0.4 k, −0.6 + 0.4 k] (layer 2 = [−0.2, 0.2] holds the ground, layer 4 = [0.6, 1.0]).
"""
from __future__ import annotations

import numpy as np

from occ_mfd.data.synthetic.geometry import Boxes, Cylinders, Spheres, make_boxes
from occ_mfd.data.synthetic.simulate import pose_matrix
from occ_mfd.data.synthetic.truth import (_Canvas, _cylinder_hits_tilted, box_hits, cylinder_hits_level,
                                          occupancy, sphere_hits)
from occ_mfd.grid import FREE_ID, LIDARSEG_TO_OCC3D, GridSpec

GRID = GridSpec((-2.0, -2.0, -1.0), (2.0, 2.0, 2.2), 0.4)
ROAD, CAR, MANMADE, VEG = (int(LIDARSEG_TO_OCC3D[i]) for i in (24, 17, 28, 30))
KZ = 2


def _road(xy):
    return np.full(len(xy), 24, np.uint8)


def _claimed(sem, cls):
    """Sorted (i, j, k) tuples of the voxels holding ``cls``."""
    return sorted(map(tuple, np.argwhere(sem == cls).tolist()))


def _box(center, size_lwh, yaw=0.0, label=17):
    l, w, h = size_lwh
    return make_boxes(center, [w, l, h], yaw, label)


def _only_objects(objects, statics=None, e2g=None):
    statics = statics or (Boxes(), Cylinders(), Spheres())
    return occupancy(GRID, np.eye(4) if e2g is None else e2g, _road, statics, objects)


def _cube(i, j, k):
    return [(a, b, c) for a in i for b in j for c in k]


def test_box_straddling_boundaries_claims_both_sides():
    # x ∈ [−0.15, 0.35] → voxels 4, 5; y ∈ [−0.45, −0.15] → 3 (only 5 cm of it), 4; z ∈ [0.7, 1.3] → layers 4, 5.
    # The old 2×2×2 sub-samples (y = −0.7, −0.5 in voxel 3) missed y voxel 3: the 5 cm sliver left it free.
    sem = _only_objects(_box([0.1, -0.3, 1.0], [0.5, 0.3, 0.6]))
    assert _claimed(sem, CAR) == _cube((4, 5), (3, 4), (4, 5))
    assert (sem[:, :, KZ] == ROAD).all()                         # the box floats: the ground stays road


def test_box_inside_one_voxel_claims_it():
    # 10 cm cube at (0.2, 0.2, 0.8), the centre of voxel (5, 5, 4): it misses every old sub-sample (±0.1 m).
    sem = _only_objects(_box([0.2, 0.2, 0.8], [0.1, 0.1, 0.1]))
    assert _claimed(sem, CAR) == [(5, 5, 4)]


def test_touching_a_face_does_not_claim():
    # Exactly voxel (6, 5, 4) = [0.4, 0.8] × [0, 0.4] × [0.6, 1.0]: its six face neighbours share only a face.
    sem = _only_objects(_box([0.6, 0.2, 0.8], [0.4, 0.4, 0.4]))
    assert _claimed(sem, CAR) == [(6, 5, 4)]
    # 1 µm past the face at x = 0.8 is a positive volume (EPS is 1 nm): voxel 7 is claimed.
    sem = _only_objects(_box([0.6 + 0.5e-6, 0.2, 0.8], [0.4 + 1e-6, 0.4, 0.4]))
    assert _claimed(sem, CAR) == [(6, 5, 4), (7, 5, 4)]


def test_yawed_box_corners_reach_the_face_neighbours_only():
    # A 0.4 m square turned 45° about voxel (5, 5, 4)'s centre: its corners reach 0.2·√2 = 0.283 m from the
    # centre, 8.3 cm into the 4 side neighbours; its edge x + y = 0.4 + 0.283 stays short of the diagonal
    # neighbours' corner (0.4, 0.4) (x + y = 0.8). Only the separating axis along the box's own edges sees it.
    sem = _only_objects(_box([0.2, 0.2, 0.8], [0.4, 0.4, 0.1], np.pi / 4))
    assert _claimed(sem, CAR) == [(4, 5, 4), (5, 4, 4), (5, 5, 4), (5, 6, 4), (6, 5, 4)]


def test_car_on_the_road_owns_the_surface_voxels_under_it():
    # Box x ∈ [0.4, 1.6] (voxels 6..8; 5 and 9 only touch), z ∈ [0, 1.2]: the ground layer (z ∈ [−0.2, 0.2])
    # too, by priority over the road.
    sem = _only_objects(_box([1.0, 1.0, 0.6], [1.2, 1.2, 1.2]))
    assert _claimed(sem, CAR) == _cube((6, 7, 8), (6, 7, 8), (2, 3, 4, 5))
    assert (sem[:, :, KZ] != FREE_ID).all() and (sem[:, :, :KZ] == FREE_ID).all()


def test_cylinder_disc_against_squares():
    # Pole r = 0.1 on the corner line x = y = 0, z ∈ [0, 1]: the 4 columns around it, layers 2..4 (layer 5
    # starts at z = 1.0: touching). Manmade beats the road in the ground layer.
    cyl = Cylinders(np.array([[0.0, 0.0]]), np.array([0.1]), np.array([0.0]), np.array([1.0]), np.array([28], np.uint8))
    sem = _only_objects(Boxes(), (Boxes(), cyl, Spheres()))
    assert _claimed(sem, MANMADE) == _cube((4, 5), (4, 5), (2, 3, 4))
    # Tangent to voxel column (5, 5)'s four faces (r = 0.2 at its axis): that column only.
    cyl.xy[0], cyl.radius[0] = (0.2, 0.2), 0.2
    assert _claimed(_only_objects(Boxes(), (Boxes(), cyl, Spheres())), MANMADE) == _cube((5,), (5,), (2, 3, 4))
    # r = 0.25 reaches 5 cm into the side columns; the diagonal ones' corner is 0.283 m away.
    cyl.radius[0] = 0.25
    got = {(i, j) for i, j, _ in _claimed(_only_objects(Boxes(), (Boxes(), cyl, Spheres())), MANMADE)}
    assert got == {(5, 5), (4, 5), (6, 5), (5, 4), (5, 6)}


def test_sphere_claims_face_neighbours_within_reach():
    # Ball r = 0.25 at voxel (5, 5, 4)'s centre: 5 cm into its 6 face neighbours; edge neighbours are 0.283 away.
    sph = Spheres(np.array([[0.2, 0.2, 0.8]]), np.array([0.25]), np.array([30], np.uint8))
    sem = _only_objects(Boxes(), (Boxes(), Cylinders(), sph))
    assert _claimed(sem, VEG) == [(4, 5, 4), (5, 4, 4), (5, 5, 3), (5, 5, 4), (5, 5, 5), (5, 6, 4), (6, 5, 4)]


def test_priority_vehicle_over_vegetation_over_manmade():
    wall = _box([0.2, 0.2, 0.8], [0.4, 0.4, 0.4], label=28)
    crown = Spheres(np.array([[0.2, 0.2, 0.8]]), np.array([0.1]), np.array([30], np.uint8))
    sem = _only_objects(Boxes(), (wall, Cylinders(), crown))
    assert sem[5, 5, 4] == VEG                                    # later in the priority order wins
    sem = _only_objects(_box([0.2, 0.2, 0.8], [0.05, 0.05, 0.05]), (wall, Cylinders(), crown))
    assert sem[5, 5, 4] == CAR


def test_yawed_and_moved_ego_sees_the_same_voxels():
    e2g = pose_matrix((100.0, 50.0), np.pi / 2)
    local = _only_objects(_box([0.1, -0.3, 1.0], [0.5, 0.3, 0.6]))
    c = e2g @ np.array([0.1, -0.3, 1.0, 1.0])
    moved = _only_objects(_box(c[:3], [0.5, 0.3, 0.6], np.pi / 2), e2g=e2g)
    np.testing.assert_array_equal(moved, local)


def _sampled(hit_fn_points, vlo, vs, n=16):
    """Brute force: does any of n³ points spread over the voxel's inside satisfy the predicate?"""
    u = (np.arange(n) + 0.5) / n * vs
    sub = np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    return hit_fn_points(vlo[..., None, :] + sub).any(-1)


def _tilted_pose():
    """A car on a 7 % ramp, rolled 3°: its ego z is not the world's."""
    a, b = np.arctan(0.07), np.radians(3)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    m = pose_matrix((3.0, -2.0), 0.4)
    m[:3, :3] = m[:3, :3] @ ry @ rx
    m[2, 3] = 0.3
    return m


def _in_cylinder(e2g, xy, r, z0, z1):
    """Predicate on ego-frame points: inside the vertical (global) cylinder."""
    def inside(p):
        g = p @ e2g[:3, :3].T + e2g[:3, 3]
        return (np.linalg.norm(g[..., :2] - xy, axis=-1) < r) & (g[..., 2] > z0) & (g[..., 2] < z1)
    return inside


def _in_box(c, axes, half):
    return lambda p: np.all(np.abs((p - c) @ axes) < half, -1)


def _assert_exact_covers_dense(exact, dense):
    """Every voxel the dense sampling finds is claimed; the extra ones are slivers (few). → # extra."""
    assert exact[dense].all() and exact.sum() <= dense.sum() * 1.3
    return int(exact.sum() - dense.sum())


def test_tilted_frame_matches_brute_force():
    # Exact tests must contain every voxel a dense sampling (16³ points) finds inside the solid, and add only
    # voxels the solid barely enters, which the sampling misses.
    cv = _Canvas(GRID, _tilted_pose())
    assert not cv.level
    rng = np.random.default_rng(0)
    vlo = np.asarray(GRID.lo) + np.argwhere(np.ones(GRID.shape, bool)) * GRID.voxel_size
    extra = 0
    for _ in range(4):
        xy, r = cv.e2g[:2, 3] + rng.uniform(-1, 1, 2), rng.uniform(0.1, 0.35)
        z0 = cv.e2g[2, 3] + rng.uniform(-0.5, 0.5)
        z1 = z0 + rng.uniform(0.2, 1.5)
        extra += _assert_exact_covers_dense(_cylinder_hits_tilted(cv, vlo, xy, r, z0, z1),
                                            _sampled(_in_cylinder(cv.e2g, xy, r, z0, z1), vlo, GRID.voxel_size))
        axes = cv.g2e[:3, :3] @ np.array([[np.cos(0.7), -np.sin(0.7), 0], [np.sin(0.7), np.cos(0.7), 0], [0, 0, 1]])
        c, half = rng.uniform(-1, 1, 3), rng.uniform(0.05, 0.6, 3)
        extra += _assert_exact_covers_dense(box_hits(vlo, GRID.voxel_size, c, axes, half),
                                            _sampled(_in_box(c, axes, half), vlo, GRID.voxel_size))
    assert extra > 0   # slivers thinner than the 2.5 cm sampling pitch exist: exact tests catch them


def test_level_and_tilted_cylinder_tests_agree_on_a_level_frame():
    cv = _Canvas(GRID, pose_matrix((1.0, 2.0), 0.3))
    vlo = np.asarray(GRID.lo) + np.argwhere(np.ones(GRID.shape, bool)) * GRID.voxel_size
    xy_g = np.array([1.3, 2.45])
    o = cv.to_ego(np.array([*xy_g, 0.0]))
    for r, z0, z1 in ((0.15, 0.0, 1.0), (0.3, 0.25, 0.61), (0.05, -0.3, 2.0)):
        np.testing.assert_array_equal(_cylinder_hits_tilted(cv, vlo, xy_g, r, z0, z1),
                                      cylinder_hits_level(vlo, GRID.voxel_size, o[:2], r, z0, z1))


def test_sphere_hits_by_distance_to_the_voxel():
    vlo = np.array([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.4, 0.4, 0.0], [0.4, 0.4, 0.4]])
    # Centre (0.2, 0.2, 0.2): face neighbour at 0.2 m, edge neighbour at 0.283 m, corner neighbour at 0.346 m.
    c = np.array([0.2, 0.2, 0.2])
    np.testing.assert_array_equal(sphere_hits(vlo, 0.4, c, 0.2), [True, False, False, False])   # tangent
    np.testing.assert_array_equal(sphere_hits(vlo, 0.4, c, 0.3), [True, True, True, False])
    np.testing.assert_array_equal(sphere_hits(vlo, 0.4, c, 0.35), [True, True, True, True])
