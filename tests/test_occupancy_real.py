"""Real nuScenes fragments (skipped when ../shared/nuscenes_real is absent)."""
import pickle

import numpy as np
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box as devkit_points_in_box
from pyquaternion import Quaternion

from occ_mfd.data.nuscenes import BoxRecord, KeyframeRecord, SceneRecord, SweepRecord, pose_matrix, read_pcd_bin
from occ_mfd.data.occupancy.accumulate import accumulate_scene
from occ_mfd.data.occupancy.generate import FrameConfig, keyframe_occupancy
from occ_mfd.data.occupancy.points import ego_mask, points_in_box, transform
from occ_mfd.grid import FREE_ID, OCC3D_GRID, category_to_occ3d

MM = "mmdetection3d/demo/data/nuscenes/"
MM_LIDAR = MM + "n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
#: mmdet3d's 10 detection classes → a nuScenes category of each (what ``category_to_occ3d`` reads).
MM_CATEGORY = {"car": "vehicle.car", "truck": "vehicle.truck", "trailer": "vehicle.trailer",
               "bus": "vehicle.bus.rigid", "construction_vehicle": "vehicle.construction",
               "bicycle": "vehicle.bicycle", "motorcycle": "vehicle.motorcycle",
               "pedestrian": "human.pedestrian.adult", "traffic_cone": "movable_object.trafficcone",
               "barrier": "movable_object.barrier"}


def _mm_sample(real_root):
    """scene-0061's first keyframe: (info, {label id: class name}) from the mmdet3d v1.x info file."""
    with open(real_root / MM / "n015-2018-07-24-11-22-45+0800.pkl", "rb") as f:
        d = pickle.load(f)
    return d["data_list"][0], {v: k for k, v in d["metainfo"]["categories"].items()}


def _rotation(m) -> Quaternion:
    return Quaternion(matrix=np.asarray(m, dtype=np.float64)[:3, :3], atol=1e-6)   # info matrices: ~1e-8 off


def _mm_boxes_in_ego(info, names) -> list[tuple[Box, int]]:
    """The sample's annotated boxes as devkit ``Box``es in the ego frame, with their ``num_lidar_pts``.

    mmdet3d v1.x ``bbox_3d`` is (x, y, z, l, w, h, yaw) in the LiDAR frame, (x, y, z) the box centre
    (mmdet3d loads nuScenes boxes with origin (0.5, 0.5, 0.5)), yaw about the LiDAR's z from its x axis.
    """
    l2e = np.asarray(info["lidar_points"]["lidar2ego"], dtype=np.float64)
    out = []
    for ins in info["instances"]:
        if ins["bbox_label_3d"] < 0:        # a category outside the 10 detection classes
            continue
        x, y, z, l, w, h, yaw = ins["bbox_3d"]
        box = Box([x, y, z], [w, l, h], Quaternion(axis=[0, 0, 1], angle=yaw), name=names[ins["bbox_label_3d"]])
        box.rotate(_rotation(l2e))
        box.translate(l2e[:3, 3])
        out.append((box, int(ins["num_lidar_pts"])))
    return out


def test_mmdet3d_keyframe_voxelises_plausibly(real_root):
    info, _ = _mm_sample(real_root)
    path = real_root / MM_LIDAR
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


def test_mmdet3d_keyframe_objects_land_on_their_own_side(real_root):
    """x/y orientation: with the keyframe's annotated boxes, every voxel of an object class lies in a box
    of that class (the devkit's boxes, taken to the ego frame by the devkit's own ``Box``), and a
    swapped or mirrored x/y would put it outside them. The z-only checks above pass either way."""
    info, names = _mm_sample(real_root)
    boxes = _mm_boxes_in_ego(info, names)
    l2e = np.asarray(info["lidar_points"]["lidar2ego"], dtype=np.float64)
    e2g = np.asarray(info["ego2global"], dtype=np.float64)
    records = []
    for i, (b, n) in enumerate(boxes):
        g = b.copy()
        g.rotate(_rotation(e2g))
        g.translate(e2g[:3, 3])
        records.append(BoxRecord(f"box{i}", MM_CATEGORY[b.name], g.center, g.wlh, g.rotation_matrix, n))
    sw = SweepRecord("kf", int(info["timestamp"] * 1e6), real_root / MM_LIDAR, l2e, e2g, True)
    kf = KeyframeRecord(info["token"], sw.timestamp, sw, [], records)
    cloud = accumulate_scene(SceneRecord("scene-0061", "t", "train", [kf]), None)
    sem = keyframe_occupancy(cloud, kf, 0, FrameConfig(grid=OCC3D_GRID)).semantics
    centers = OCC3D_GRID.centers()

    def in_class_boxes(pts, cls):
        """(N,) bool: inside a box of Occ3D class ``cls``, grown by 0.6 m per side (the 0.2 m collection
        margin + a voxel's half-diagonal)."""
        inside = np.zeros(len(pts), bool)
        for b, _ in boxes:
            if category_to_occ3d(MM_CATEGORY[b.name]) == cls:
                grown = b.copy()
                grown.wlh = b.wlh + 1.2
                inside |= devkit_points_in_box(grown, pts.T)
        return inside

    # The truck (the box with most points) is ahead on the left: its voxels are there too.
    truck, n_truck = max(boxes, key=lambda bn: bn[1])
    assert truck.name == "truck" and n_truck > 400
    truck_vox = centers[sem == category_to_occ3d("vehicle.truck")]
    assert len(truck_vox) > 50
    expected_side = np.sign(truck.center[:2])
    assert (expected_side == [1, 1]).all()                           # the devkit's box: +x (ahead), +y (left)
    assert (np.sign(truck_vox[:, :2]) == expected_side).all()
    assert np.linalg.norm(truck_vox[:, :2].mean(0) - truck.center[:2]) < 3.0
    # Every object voxel (classes 1-10; 0 "others" is the unlabelled static scene here) lies in a box of
    # its class; with x/y swapped or mirrored, (almost) none would.
    obj_classes = np.unique(sem[(sem >= 1) & (sem <= 10)])
    n_obj = 0
    for cls in obj_classes:
        pts = centers[sem == cls]
        n_obj += len(pts)
        assert in_class_boxes(pts, cls).all(), f"class {cls} voxels outside its boxes"
        for wrong in (pts[:, [1, 0, 2]], pts * [1, -1, 1], pts * [-1, 1, 1]):
            assert in_class_boxes(wrong, cls).mean() < 0.5
    assert n_obj > 300 and len(obj_classes) >= 4


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
