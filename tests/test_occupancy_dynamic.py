"""Dynamic objects: accumulated in the box frame, placed at the target pose — no trails."""
import numpy as np

from occ_mfd.data.nuscenes import BoxRecord, KeyframeRecord, SceneRecord, SweepRecord
from occ_mfd.data.occupancy.accumulate import accumulate_scene
from occ_mfd.data.occupancy.generate import FrameConfig, keyframe_occupancy
from occ_mfd.data.occupancy.quality import trail_count
from occ_mfd.grid import FREE_ID, GridSpec

G = GridSpec((-20, -20, -1), (20, 20, 3), 0.4)
CAR = 4


def _box(x):
    return BoxRecord("inst", "vehicle.car", np.array([x, 8.0, 0.8]), np.array([2.0, 4.0, 1.6]), np.eye(3))


def _car_points(x, rng):
    """Points on the car's surfaces (global = sensor frame here) at box centre x."""
    u = rng.uniform(-1, 1, (400, 3)) * [2.0, 1.0, 0.8]
    face = rng.integers(0, 3, 400)
    u[np.arange(400), face] = np.sign(u[np.arange(400), face]) * np.array([2.0, 1.0, 0.8])[face]
    return u + [x, 8.0, 0.8]


def test_moving_car_lands_only_in_its_box(tmp_path):
    rng = np.random.default_rng(0)
    xs = [-10.0, -4.0, 2.0, 8.0]  # 12 m/s at 2 Hz
    kfs, car = [], []
    for k, x in enumerate(xs):
        ground = np.c_[rng.uniform(-19, 19, (3000, 2)), np.zeros(3000)]
        car.append(_car_points(x, rng))
        pts = np.r_[ground, car[-1]]
        pts = np.c_[pts, np.zeros((len(pts), 2))].astype(np.float32)
        path = tmp_path / f"{k}.pcd.bin"
        pts.tofile(path)
        sw = SweepRecord(f"s{k}", k * 500_000, path, np.eye(4), np.eye(4), True)
        kfs.append(KeyframeRecord(f"k{k}", k * 500_000, sw, [], [_box(x)]))
    scene = SceneRecord("scene-x", "t", "train", kfs)
    cloud = accumulate_scene(scene, boxes_of=None)  # keyframes only: their own boxes
    # Exactly the car points above the ground clearance (0.15 m) went to the instance; no road point.
    expected = sum(int((c[:, 2] >= 0.15).sum()) for c in car)
    assert len(cloud.instances["inst"][0]) == expected
    for k in range(4):
        f = keyframe_occupancy(cloud, kfs[k], k, FrameConfig(grid=G, ray_window=0, fill_ground=0))
        dyn, trail = trail_count(f.semantics, G, [_box(xs[k])], np.eye(4))
        assert dyn > 50 and trail == 0
        # All four scans' car points are there (accumulated), at this keyframe's pose only.
        cx = np.argwhere(f.semantics == CAR)
        centres = G.index_to_center(cx)
        assert np.all(np.abs(centres[:, 0] - xs[k]) <= 2.0 + 0.4)
        # Where the car was at the other keyframes there is no car (and its ground stays ground/free).
        for j in range(4):
            if j != k:
                idx, ok = G.point_to_index(np.array([[xs[j], 8.0, 0.8]]))
                assert f.semantics[tuple(idx[0])] == FREE_ID or abs(xs[j] - xs[k]) < 4.4


def test_sweep_between_keyframes_does_not_see_through_moved_car(tmp_path):
    """A sweep taken after the keyframe sees the car elsewhere; its rays cross the car's volume *at the
    keyframe* — that volume must not become observed free space (the inside of a car is never seen)."""
    rng = np.random.default_rng(1)
    s2e = np.eye(4)
    s2e[2, 3] = 1.8                                       # sensor 1.8 m above the ground, ego = global
    wall = np.c_[rng.uniform(-3, 3, 4000), np.full(4000, 12.0), rng.uniform(0.05, 2.0, 4000)]
    ground = np.c_[rng.uniform(-19, 19, (3000, 2)), np.zeros(3000)]

    def sweep(tok, t, pts, key):
        p = np.c_[pts - [0, 0, 1.8], np.zeros((len(pts), 2))].astype(np.float32)
        p.tofile(tmp_path / f"{tok}.pcd.bin")
        return SweepRecord(tok, t, tmp_path / f"{tok}.pcd.bin", s2e, np.eye(4), key)

    car0 = _car_points(0.0, rng)
    front = car0[car0[:, 1] <= 7.0 + 1e-6]                # the face the sensor sees at the keyframe
    shadow = (ground[:, 1] > 7.0) & (np.abs(ground[:, 0] * 7.0 / ground[:, 1]) < 2.0)  # hidden by the car
    key = sweep("k0", 0, np.r_[ground[~shadow], front, wall[np.abs(wall[:, 0]) > 2.5]], True)
    after = sweep("s0", 250_000, np.r_[ground, wall, _car_points(6.0, rng)[:50] * [1, 0, 1] + [0, 7.0, 0]], False)
    kf = KeyframeRecord("k0", 0, key, [after], [_box(0.0)])
    scene = SceneRecord("scene-y", "t", "train", [kf])
    cloud = accumulate_scene(scene, boxes_of=lambda sw, k: [_box(6.0)])
    inner = np.array([[x, y, z] for x in (-1.0, 0.0, 1.0) for y in (7.8, 8.2) for z in (0.6, 1.0)])
    idx, ok = G.point_to_index(inner)
    assert ok.all()
    old = keyframe_occupancy(cloud, kf, 0, FrameConfig(grid=G, fill_ground=0, box_rays_key_only=False))
    assert old.mask_lidar[tuple(idx.T)].all()            # the later sweep's rays went through the car
    f = keyframe_occupancy(cloud, kf, 0, FrameConfig(grid=G, fill_ground=0))
    assert not f.mask_lidar[tuple(idx.T)].any()          # now: the car's inside is unobserved
    # The car (its seen face) is still labelled, and the free space behind its keyframe box that the
    # later sweep saw stays observed.
    assert (f.semantics == CAR).sum() > 10
    behind, _ = G.point_to_index(np.array([[x, y, z] for x in (-0.6, -0.2, 0.2, 0.6)
                                           for y in (10.2, 10.6, 11.0, 11.4) for z in (0.4, 0.8, 1.2)]))
    assert f.mask_lidar[tuple(behind.T)].mean() > 0.5
    np.testing.assert_array_equal(f.mask_lidar[tuple(behind.T)], old.mask_lidar[tuple(behind.T)])
