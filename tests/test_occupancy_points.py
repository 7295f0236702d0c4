"""Majority vote, ego-point removal, points-in-box, and bad LiDAR files."""
import numpy as np
import pytest

from occ_mfd.data.nuscenes import read_lidarseg, read_pcd_bin
from occ_mfd.data.occupancy.generate import fill_ground_holes
from occ_mfd.data.occupancy.points import ego_mask, majority_vote, points_in_box
from occ_mfd.grid import FREE_ID, GridSpec

G = GridSpec((0, 0, 0), (4, 4, 4), 1.0)


def test_majority_vote_by_hand():
    pts = np.array([[0.5, 0.5, 0.5]] * 3 + [[0.2, 0.7, 0.1]] * 2      # voxel (0,0,0): 3× class 4, 2× class 7
                   + [[2.5, 1.5, 3.5]] * 2 + [[2.1, 1.9, 3.2]] * 2    # voxel (2,1,3): tie 9 vs 3 → 3
                   + [[9.0, 0, 0]])                                    # outside: ignored
    lab = np.array([4, 4, 4, 7, 7, 9, 9, 3, 3, 1])
    vox, cls = majority_vote(pts, lab, G)
    assert vox.tolist() == [0, np.ravel_multi_index((2, 1, 3), G.shape)]
    assert cls.tolist() == [4, 3]


def test_ego_points_removed_in_sensor_frame():
    # Sensor mounted 0.94 m ahead of the rear axle at 1.84 m, yawed −90° (x_sensor = −y_ego).
    s2e = np.eye(4)
    s2e[:3, :3] = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]
    s2e[:3, 3] = [0.94, 0, 1.84]
    pts = np.array([[0.0, 1.0, -0.5],     # ego (1.94, 0, 1.34): on the bonnet → removed
                    [0.0, -2.0, -1.0],    # ego (-1.06, 0, 0.84): the boot → removed
                    [0.0, 4.0, -1.8],     # ego (4.94, 0, 0.04): road ahead → kept
                    [3.0, 0.0, -1.0]])    # ego (0.94, -3, 0.84): beside the car → kept
    assert ego_mask(pts, s2e).tolist() == [True, True, False, False]


def test_points_in_box_uses_length_along_x():
    box = np.eye(4)
    box[:3, 3] = [10, 0, 1]
    yaw = np.pi / 2
    box[:3, :3] = [[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]]
    wlh = np.array([2.0, 4.0, 2.0])  # length 4 now along global y
    pts = np.array([[10, 1.9, 1], [10, 2.1, 1], [10.9, 0, 1], [11.1, 0, 1], [10, 0, -0.1]])
    m, _ = points_in_box(pts, box, wlh)
    assert m.tolist() == [True, False, True, False, False]


def test_fill_ground_closes_ring_gaps_only():
    sem = np.full((6, 6, 3), FREE_ID, np.uint8)
    sem[:, :, 1] = 11
    sem[2, 2, 1] = FREE_ID        # a gap inside the road: filled
    sem[4, 4, 1] = FREE_ID
    sem[4, 4, 2] = 4              # a gap under a car (column not empty): left alone
    out = fill_ground_holes(sem)
    assert out[2, 2, 1] == 11 and out[4, 4, 1] == FREE_ID and out[0, 0, 0] == FREE_ID


def test_bad_pcd_errors_name_the_file(tmp_path):
    p = tmp_path / "x.pcd.bin"
    np.arange(10, dtype=np.float32).tofile(p)
    assert read_pcd_bin(p).shape == (2, 5)
    np.arange(11, dtype=np.float32).tofile(p)
    with pytest.raises(ValueError, match=r"x\.pcd\.bin.*multiple of 20"):
        read_pcd_bin(p)
    a = np.zeros((3, 5), np.float32)
    a[1, 2] = np.nan
    a.tofile(p)
    with pytest.raises(ValueError, match=r"x\.pcd\.bin.*NaN"):
        read_pcd_bin(p)
    with pytest.raises(FileNotFoundError, match="missing.pcd.bin"):
        read_pcd_bin(tmp_path / "missing.pcd.bin")
    q = tmp_path / "l.bin"
    np.zeros(4, np.uint8).tofile(q)
    with pytest.raises(ValueError, match=r"l\.bin.*4 lidarseg labels for 3"):
        read_lidarseg(q, 3)
