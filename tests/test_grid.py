import numpy as np
import pytest

from occ_mfd.grid import (FREE_ID, IGNORE, LIDARSEG_CLASSES, LIDARSEG_TO_OCC3D, NUM_CLASSES,
                          OCC3D_CLASSES, OCC3D_GRID, PALETTE, GridSpec, category_to_occ3d,
                          lidarseg_to_occ3d)


def test_occ3d_grid_shape_and_edges():
    g = OCC3D_GRID
    assert g.shape == (200, 200, 16)
    # Voxel i covers [lo + i*size, lo + (i+1)*size): lower edge inclusive, upper exclusive.
    pts = np.array([[-40.0, -40.0, -1.0], [-39.5999999, 0.0, 5.39], [40.0, 0, 0], [0, 0, 5.4],
                    [-40.0001, 0, 0], [0.0, 0.0, 0.0], [0.39, 0.41, -0.61]])
    idx, inside = g.point_to_index(pts)
    assert inside.tolist() == [True, True, False, False, False, True, True]
    assert idx[0].tolist() == [0, 0, 0]
    assert idx[1].tolist() == [1, 100, 15]
    assert idx[5].tolist() == [100, 100, 2]  # ground z=0 sits in layer 2: [-0.2, 0.2)
    assert idx[6].tolist() == [100, 101, 0]


def test_index_center_roundtrip():
    g = GridSpec((-40, -40, -1), (40, 40, 5.4), 0.8)
    assert g.shape == (100, 100, 8)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, n, 500) for n in g.shape], 1)
    back, inside = g.point_to_index(g.index_to_center(idx))
    assert inside.all() and (back == idx).all()
    np.testing.assert_allclose(g.index_to_center([[0, 0, 0]])[0], [-39.6, -39.6, -0.6])
    c = g.centers()
    assert c.shape == (100, 100, 8, 3)
    np.testing.assert_allclose(c[99, 0, 7], [39.6, -39.6, 5.0], atol=1e-5)


def test_gridspec_validation_and_dict():
    with pytest.raises(ValueError, match="whole number"):
        GridSpec((-40, -40, -1), (40, 40, 5.4), 0.3)
    g = OCC3D_GRID
    assert GridSpec.from_dict(g.to_dict()) == g
    assert g.pooled(2) == GridSpec((-40, -40, -1), (40, 40, 5.4), 0.8)
    with pytest.raises(ValueError, match="labels.npz: grid mismatch"):
        g.check_same(g.pooled(2), "labels.npz")


def test_class_table():
    assert NUM_CLASSES == 18 and FREE_ID == 17 and OCC3D_CLASSES[FREE_ID] == "free"
    assert PALETTE.shape == (18, 3) and PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in PALETTE}) == 18  # every class distinguishable


def test_lidarseg_mapping_hand_cases():
    assert len(LIDARSEG_CLASSES) == 32
    cases = {0: IGNORE, 31: IGNORE, 24: 11, 17: 4, 2: 7, 6: 7, 9: 1, 12: 8, 15: 3, 16: 3, 18: 5,
             21: 6, 22: 9, 23: 10, 25: 12, 26: 13, 27: 14, 28: 15, 30: 16, 29: 0, 1: 0, 19: 0}
    for fine, occ in cases.items():
        assert LIDARSEG_TO_OCC3D[fine] == occ, LIDARSEG_CLASSES[fine]
    assert lidarseg_to_occ3d(np.array([[24, 31]])).tolist() == [[11, IGNORE]]
    with pytest.raises(ValueError):
        lidarseg_to_occ3d(np.array([32]))
    assert category_to_occ3d("vehicle.car") == 4 and category_to_occ3d("unknown.thing") == 0


def test_lidarseg_mapping_matches_devkit():
    """Our table equals the devkit's challenge mapping, its 'ignore' being Occ3D 'others' (0)."""
    utils = pytest.importorskip("nuscenes.eval.lidarseg.utils")

    class _Fake:  # the mapper only needs the fine name → index table
        lidarseg_name2idx_mapping = {n: i for i, n in enumerate(LIDARSEG_CLASSES)}

    ref = utils.LidarsegClassMapper(_Fake()).get_fine_idx_2_coarse_idx()
    for fine, coarse in ref.items():
        ours = LIDARSEG_TO_OCC3D[fine]
        if LIDARSEG_CLASSES[fine] in ("noise", "vehicle.ego"):
            assert ours == IGNORE and coarse == 0
        else:
            assert ours == coarse, LIDARSEG_CLASSES[fine]


def test_real_lidarseg_points_map(real_root):
    """The 40 real labelled points: ego returns near the sensor are dropped, the ground is driveable."""
    base = real_root / "mmdetection3d/_commit_2691dd6c4/tests/data/nuscenes"
    pcd = next((base / "samples/LIDAR_TOP").glob("*.pcd.bin"))
    lab = next((base / "lidarseg/v1.0-trainval").glob("*_lidarseg.bin"))
    pts = np.fromfile(pcd, dtype=np.float32).reshape(-1, 5)
    labels = np.fromfile(lab, dtype=np.uint8)
    assert len(pts) == len(labels) == 40
    occ = lidarseg_to_occ3d(labels)
    r = np.linalg.norm(pts[:, :2], axis=1)
    assert (occ[labels == 31] == IGNORE).all() and (r[labels == 31] < 2.5).all()
    assert (occ[labels == 24] == 11).all()
