"""Real nuScenes fragments (skipped when ../shared/nuscenes_real is absent)."""
import pickle

import numpy as np

from occ_mfd.data.nuscenes import BoxRecord, KeyframeRecord, SceneRecord, SweepRecord, pose_matrix, read_pcd_bin
from occ_mfd.data.occupancy.accumulate import accumulate_scene
from occ_mfd.data.occupancy.generate import FrameConfig, keyframe_occupancy
from occ_mfd.data.occupancy.points import ego_mask, points_in_box, transform
from occ_mfd.grid import FREE_ID, OCC3D_GRID

MM = "mmdetection3d/demo/data/nuscenes/"


def test_mmdet3d_keyframe_voxelises_plausibly(real_root):
    with open(real_root / MM / "n015-2018-07-24-11-22-45+0800.pkl", "rb") as f:
        info = pickle.load(f)["data_list"][0]
    path = real_root / MM / "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
    l2e = np.asarray(info["lidar_points"]["lidar2ego"], dtype=np.float64)
    e2g = np.asarray(info["ego2global"], dtype=np.float64)
    raw = read_pcd_bin(path)
    assert raw.shape == (34688, 5)
    ego = ego_mask(raw, l2e)
    # The car's own returns (roof, and zero-range returns at the sensor) lie within 3 m of the sensor;
    # after removal nothing is left within 1 m (the devkit's remove_close radius).
    r = np.linalg.norm(raw[:, :2], axis=1)
    assert ego.sum() > 1000 and r[ego].max() < 3.0
    assert r[~ego].min() > 1.0
    assert ego.sum() < 0.3 * len(raw)
    sw = SweepRecord("kf", int(info["timestamp"] * 1e6), path, l2e, e2g, True)
    kf = KeyframeRecord(info["token"], sw.timestamp, sw, [], [])
    cloud = accumulate_scene(SceneRecord("scene-0061", "t", "train", [kf]), None)
    f = keyframe_occupancy(cloud, kf, 0, FrameConfig(grid=OCC3D_GRID))
    occ = f.semantics != FREE_ID
    per_layer = occ.sum(axis=(0, 1))
    assert occ.sum() > 3000
    assert per_layer.argmax() <= 3              # ground: the most populated layer is z < 0.6 m
    assert per_layer[:4].sum() > 0.4 * occ.sum()
    assert f.mask_lidar.sum() > 10 * occ.sum() // 4  # rays observe much more than they hit
    assert not (f.mask_lidar[occ] == 0).all()


def test_scene0103_sweep_aligns_with_keyframe_boxes(real_root):
    with open(real_root / "fastbev21/data/nuscenes/nuscenes_infos_val.pkl", "rb") as f:
        infos = pickle.load(f)["infos"]
    sw = infos[1]["sweeps"][8]
    assert sw["sample_data_token"] == "53c30444ce0d4217b0d465c0a16ffbb9"
    pts = read_pcd_bin(real_root / "mmdetection3d/_commit_4ed472307/demo/"
                       "nuscenes_n008-2018-08-01-15-16-36-0400__LIDAR_TOP__1533151603597909.pcd.bin")
    s2g = pose_matrix(sw["ego2global_rotation"], sw["ego2global_translation"]) @ \
        pose_matrix(sw["sensor2ego_rotation"], sw["sensor2ego_translation"])

    def lidar2global(info):
        return pose_matrix(info["ego2global_rotation"], info["ego2global_translation"]) @ \
            pose_matrix(info["lidar2ego_rotation"], info["lidar2ego_translation"])
    # Our pose chain agrees with the info's precomputed sweep→(infos[1] keyframe) lidar transform.
    s2l = np.eye(4)
    s2l[:3, :3], s2l[:3, 3] = sw["sensor2lidar_rotation"], sw["sensor2lidar_translation"]
    assert np.allclose(np.linalg.inv(lidar2global(infos[1])) @ s2g, s2l, atol=1e-6)
    kf = infos[0]  # the sweep is 50 ms after this keyframe: its boxes hold the sweep's points
    l2g = lidar2global(kf)
    glob = transform(pts, s2g)
    n_pts = np.asarray(kf["num_lidar_pts"])
    i = int(np.flatnonzero(n_pts == 68)[0])
    assert kf["gt_names"][i] == "pedestrian"
    x, y, z, w, l, h, yaw = kf["gt_boxes"][i]  # lidar frame, centre, (w, l, h), yaw about z
    b2l = np.eye(4)
    b2l[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
    b2l[:3, 3] = [x, y, z]
    box = BoxRecord("ped", "human.pedestrian.adult", (l2g @ b2l)[:3, 3], np.array([w, l, h]), (l2g @ b2l)[:3, :3])
    inside, _ = points_in_box(glob, box.box2global(), box.wlh)
    assert abs(int(inside.sum()) - 68) <= 3
    # A wrong chain (the sweep's own ego pose taken as the keyframe's) misses the pedestrian box.
    wrong = transform(pts, pose_matrix(kf["ego2global_rotation"], kf["ego2global_translation"])
                      @ pose_matrix(sw["sensor2ego_rotation"], sw["sensor2ego_translation"]))
    assert abs(int(points_in_box(wrong, box.box2global(), box.wlh)[0].sum()) - 68) > 3
