"""The synthetic world simulator: ray-caster exactness, agent tracks, determinism and exact truth."""
from __future__ import annotations

import numpy as np
import pytest

from occ_mfd.data.occupancy.points import ego_mask
from occ_mfd.data.synthetic.geometry import Cylinders, Spheres, concat_boxes, inside_boxes, make_boxes
from occ_mfd.data.synthetic.lidar import EGO_LABEL, LidarModel, Scene, cast
from occ_mfd.data.synthetic.simulate import lidar_calibration, pose_matrix, simulate_scene
from occ_mfd.data.synthetic.town import build_town
from occ_mfd.data.synthetic.truth import occupancy
from occ_mfd.ego import NUSCENES_EGO
from occ_mfd.grid import FREE_ID, LIDARSEG_CLASSES, LIDARSEG_TO_OCC3D, GridSpec

EXACT = LidarModel(range_noise=0.0, noise_fraction=0.0)


def _scene(boxes=None, cyl=None, sph=None):
    return Scene(boxes if boxes is not None else concat_boxes([]), cyl or Cylinders(), sph or Spheres(),
                 lambda xy: np.full(len(xy), 24, np.uint8))


def _sensor(h=1.84):
    m = np.eye(4)
    m[2, 3] = h
    return m


def _ranges(pts):
    return np.linalg.norm(pts[:, :3].astype(np.float64), axis=1)


def test_plane_ranges_per_ring():
    h = 1.84
    pts, lab = cast(EXACT, _sensor(h), _scene(), np.random.default_rng(0))
    el = EXACT.elevations()
    ring = pts[:, 4].astype(int)
    expected = h / np.sin(-el[ring])
    np.testing.assert_allclose(_ranges(pts), expected, rtol=1e-5)
    assert np.all(lab == 24)
    # Every downward ring whose ground hit lies within range returns on all azimuths; the others none.
    hit_rings = np.flatnonzero((el < 0) & (h / np.sin(np.maximum(-el, 1e-9)) <= EXACT.max_range))
    np.testing.assert_array_equal(np.bincount(ring, minlength=32)[hit_rings], EXACT.azimuth_steps)
    assert len(pts) == len(hit_rings) * EXACT.azimuth_steps


@pytest.mark.parametrize("yaw,half_lw", [(0.0, (0.5, 2.0)), (np.pi / 2, (2.0, 0.5))])
def test_box_face_at_known_distance(yaw, half_lw):
    # A 1 m deep, 4 m wide wall whose near face is the plane x = 9.5 (both yaw conventions).
    box = make_boxes([10.0, 0.0, 1.0], [2 * half_lw[1], 2 * half_lw[0], 6.0], yaw, 28)
    pts, lab = cast(EXACT, _sensor(), _scene(box), np.random.default_rng(0))
    on = lab == 28
    assert on.sum() > 100
    np.testing.assert_allclose(pts[on, 0], 9.5, atol=1e-4)
    assert np.all(np.abs(pts[on, 1]) <= 2.0 + 1e-4)
    # The ray straight ahead on the near-horizontal ring: range = 9.5 / cos(elevation).
    el = EXACT.elevations()
    k = int(np.argmin(np.abs(el)))
    ahead = on & (pts[:, 4] == k) & (np.abs(pts[:, 1]) < 1e-6)
    assert ahead.sum() == 1
    np.testing.assert_allclose(_ranges(pts[ahead]), 9.5 / np.cos(el[k]), rtol=1e-6)


def test_cylinder_and_sphere_distances():
    cyl = Cylinders(np.array([[10.0, 0.0]]), np.array([1.0]), np.array([0.0]), np.array([10.0]), np.array([30], np.uint8))
    pts, lab = cast(EXACT, _sensor(), _scene(cyl=cyl), np.random.default_rng(0))
    el = EXACT.elevations()
    k = int(np.argmin(np.abs(el)))
    ahead = (lab == 30) & (pts[:, 4] == k) & (np.abs(pts[:, 1]) < 1e-6)
    np.testing.assert_allclose(_ranges(pts[ahead]), 9.0 / np.cos(el[k]), rtol=1e-6)
    xy = pts[lab == 30, :2].astype(np.float64) - [10.0, 0.0]
    np.testing.assert_allclose(np.hypot(*xy.T), 1.0, atol=1e-4)   # every hit lies on the mantle
    sph = Spheres(np.array([[0.0, 12.0, 1.84]]), np.array([2.0]), np.array([30], np.uint8))
    pts, lab = cast(EXACT, _sensor(), _scene(sph=sph), np.random.default_rng(0))
    d = np.linalg.norm(pts[lab == 30, :3].astype(np.float64) - [0.0, 12.0, 0.0], axis=1)
    assert (lab == 30).sum() > 20
    np.testing.assert_allclose(d, 2.0, atol=1e-4)


def test_occlusion_box_behind_box():
    front = make_boxes([10.0, 0.0, 2.0], [6.0, 1.0, 4.0], 0.0, 28)      # 6 m wide, 4 m tall
    behind = make_boxes([20.0, 0.0, 1.0], [2.0, 1.0, 2.0], 0.0, 30)     # inside its shadow
    pts, lab = cast(EXACT, _sensor(), _scene(concat_boxes([front, behind])), np.random.default_rng(0))
    assert (lab == 28).sum() > 100 and (lab == 30).sum() == 0
    pts, lab = cast(EXACT, _sensor(), _scene(behind), np.random.default_rng(0))
    assert (lab == 30).sum() > 10   # visible without the front box


def test_truth_box_fills_hand_computed_voxels():
    grid = GridSpec((-4.0, -4.0, -1.0), (4.0, 4.0, 2.2), 0.4)
    ground = lambda xy: np.full(len(xy), 24, np.uint8)  # noqa: E731
    expected = np.full(grid.shape, FREE_ID, np.uint8)
    expected[:, :, 2] = LIDARSEG_TO_OCC3D[24]          # the layer [-0.2, 0.2) holds z = 0
    # Box x, y ∈ [0.4, 1.6], z ∈ [0, 1.2]: voxels 11..13 in x and y; z layers 2 (tie with the
    # ground: 4 sub-samples each, the object wins), 3, 4, and 5 (sub-sample z = 1.1 is inside).
    expected[11:14, 11:14, 2:6] = LIDARSEG_TO_OCC3D[17]
    box = make_boxes([1.0, 1.0, 0.6], [1.2, 1.2, 1.2], 0.0, 17)
    empty = (concat_boxes([]), Cylinders(), Spheres())
    np.testing.assert_array_equal(occupancy(grid, np.eye(4), ground, empty, box), expected)
    # The same box seen from a moved, yawed ego: the ego frame is what counts.
    e2g = pose_matrix((100.0, 50.0), np.pi / 2)
    centre = e2g @ np.array([1.0, 1.0, 0.6, 1.0])
    box_g = make_boxes(centre[:3], [1.2, 1.2, 1.2], np.pi / 2, 17)
    np.testing.assert_array_equal(occupancy(grid, e2g, ground, empty, box_g), expected)


def test_calibration_matches_nuscenes_lidar_top():
    m = lidar_calibration()
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(m[:3, 0], [0.0, -1.0, 0.0], atol=0.01)   # sensor x = ego right
    np.testing.assert_allclose(m[:3, 3], [0.943713, 0.0, 1.84023])


@pytest.fixture(scope="module")
def scene():
    return simulate_scene("t", seed=3, num_keyframes=4, sweeps_per_keyframe=2, split="train", with_truth=True)


def test_ego_returns_lie_in_the_pipelines_removal_box(scene):
    # The simulator's car (its occluder) and the pipeline's removal box come from one definition: every
    # simulated return off the ego lies in the box, and the box swallows (almost) nothing else.
    for s in scene.sweeps:
        if not s.is_key:
            continue
        inside = ego_mask(s.points, scene.calib.sensor2ego)
        is_ego = s.labels == EGO_LABEL
        assert is_ego.sum() > 100 and inside[is_ego].all()
        assert (inside & ~is_ego).sum() <= 0.01 * is_ego.sum()


def test_timeline_and_point_counts(scene):
    ts = np.array([s.timestamp for s in scene.sweeps])
    np.testing.assert_array_equal(np.diff(ts), 250_000)
    assert [s.is_key for s in scene.sweeps] == [True, False, True, False, True, False, True]
    for s in scene.sweeps:
        assert s.points.dtype == np.float32 and s.points.shape[1] == 5 and len(s.labels) == len(s.points)
        assert 20_000 <= len(s.points) <= 40_000
        assert 0 < np.mean(s.labels == 31) < 0.15 and np.mean(s.labels == 0) < 0.01


def test_agent_points_inside_boxes(scene):
    total, inside = 0, 0
    for k, key in enumerate(scene.keyframes):
        s2g = key.ego2global @ scene.calib.sensor2ego
        pg = key.points[:, :3].astype(np.float64) @ s2g[:3, :3].T + s2g[:3, 3]
        for a in scene.agents:
            st = a.states[k]
            lab = LIDARSEG_CLASSES.index(a.category)
            c, s = np.cos(st.yaw), np.sin(st.yaw)
            rel = pg - st.center
            local = np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], 1)
            half = np.array([a.size[1], a.size[0], a.size[2]]) / 2
            near = (key.labels == lab) & np.all(np.abs(local) <= half + 1.0, axis=1)
            ok = np.all(np.abs(local[near]) <= half, axis=1)
            total += near.sum()
            inside += ok.sum()
            in_box = np.all(np.abs(local) <= half, axis=1).sum()
            assert st.num_lidar_pts == in_box
    assert total > 200 and inside / total >= 0.99


def test_velocities_match_finite_differences(scene):
    n = 0
    for a in scene.agents:
        for k in (1, 2):
            fd = (a.states[k + 1].center[:2] - a.states[k - 1].center[:2]) / 1.0
            assert np.linalg.norm(fd - a.states[k].velocity) < 0.6
            assert a.states[k].moving == (np.linalg.norm(a.states[k].velocity) > 0.1)
            n += a.states[k].moving
    assert n > 0


def test_ego_speed_in_range(scene):
    pos = np.array([s.ego2global[:2, 3] for s in scene.sweeps])
    speed = np.linalg.norm(np.diff(pos, axis=0), axis=1) / 0.25
    assert np.all(speed <= 15.0 + 1e-6) and np.all(speed >= 0)
    np.testing.assert_allclose([s.ego2global[2, 3] for s in scene.sweeps], 0.0)


def test_truth_contains_annotated_agents(scene):
    assert len(scene.truth) == 4
    grid = GridSpec()
    for k, (key, occ) in enumerate(zip(scene.keyframes, scene.truth)):
        assert occ.shape == grid.shape and occ.dtype == np.uint8
        g2e = np.linalg.inv(key.ego2global)
        for a in scene.agents:
            c = g2e @ np.append(a.states[k].center, 1.0)
            idx, ok = grid.point_to_index(c[None, :3])
            if ok[0] and a.category.startswith("vehicle.car"):
                assert occ[tuple(idx[0])] == LIDARSEG_TO_OCC3D[LIDARSEG_CLASSES.index(a.category)]
        assert np.all(occ[:, :, :2] == FREE_ID)   # below the ground layer


def test_determinism_by_seed():
    a = simulate_scene("x", seed=11, num_keyframes=2, sweeps_per_keyframe=1, split="val")
    b = simulate_scene("x", seed=11, num_keyframes=2, sweeps_per_keyframe=1, split="val")
    c = simulate_scene("x", seed=12, num_keyframes=2, sweeps_per_keyframe=1, split="val")
    for sa, sb in zip(a.sweeps, b.sweeps):
        np.testing.assert_array_equal(sa.points, sb.points)
        np.testing.assert_array_equal(sa.labels, sb.labels)
        np.testing.assert_array_equal(sa.ego2global, sb.ego2global)
    np.testing.assert_array_equal(a.map_png, b.map_png)
    assert len(a.agents) == len(b.agents)
    assert not np.array_equal(a.map_png, c.map_png)
    assert a.location == "synth-town-11" and c.location == "synth-town-12"
    assert a.map_png.shape == (4000, 4000) and set(np.unique(a.map_png)) <= {24, 25, 26, 27}


def test_agents_never_interpenetrate_world_ego_or_each_other(scene):
    town = build_town(np.random.default_rng(3))  # the town is the first draw of the scene's seed
    u = np.stack(np.meshgrid(*[np.linspace(-0.45, 0.45, 4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for k, key in enumerate(scene.keyframes):
        e = key.ego2global
        ego = make_boxes((e @ [*NUSCENES_EGO.body.center, 1])[:3], NUSCENES_EGO.wlh, np.arctan2(e[1, 0], e[0, 0]), 31)
        phys = [a.size - [0.2, 0.2, 0.1] for a in scene.agents]
        boxes = concat_boxes([make_boxes([a.states[k].center[0], a.states[k].center[1], s[2] / 2], s,
                                         a.states[k].yaw, 17) for a, s in zip(scene.agents, phys)])
        for i, s in enumerate(phys):
            c, sn = np.cos(boxes.yaw[i]), np.sin(boxes.yaw[i])
            loc = u * [s[1], s[0], s[2]]
            p = np.stack([c * loc[:, 0] - sn * loc[:, 1], sn * loc[:, 0] + c * loc[:, 1], loc[:, 2]], 1) \
                + boxes.center[i]
            assert not inside_boxes(p, ego, 0).any()
            near = np.flatnonzero(np.linalg.norm(boxes.center[:, :2] - boxes.center[i, :2], axis=1) < 20)
            assert not any(inside_boxes(p, boxes, j).any() for j in near if j != i)
            near = np.flatnonzero(np.linalg.norm(town.boxes.center[:, :2] - boxes.center[i, :2], axis=1) < 60)
            assert not any(inside_boxes(p, town.boxes, j).any() for j in near)
            cy, sp = town.cylinders, town.spheres
            d = np.hypot(p[:, None, 0] - cy.xy[None, :, 0], p[:, None, 1] - cy.xy[None, :, 1])
            assert not ((d <= cy.radius) & (p[:, None, 2] <= cy.z1)).any()
            assert not (np.linalg.norm(p[:, None] - sp.center[None], axis=-1) <= sp.radius).any()
