"""mask_camera frustum test on a hand case."""
from types import SimpleNamespace

import numpy as np

from occ_mfd.grid import GridSpec
from occ_mfd.data.occupancy.camera import frustum_mask

G = GridSpec((-4, -4, 0), (4, 4, 1), 1.0)


def test_forward_camera_sees_a_90_degree_wedge():
    # Camera at the origin looking along ego +x (optical z = ego x, optical x = −ego y, optical y = −ego z).
    cam2ego = np.eye(4)
    cam2ego[:3, :3] = np.array([[0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    K = np.array([[100.0, 0, 100], [0, 100.0, 100], [0, 0, 1]])  # 200×200 px → 90° field of view
    cam = SimpleNamespace(cam2ego=cam2ego, ego2global=np.eye(4), intrinsic=K, width=200, height=200)
    m = frustum_mask(G, [cam], np.eye(4))[:, :, 0]
    c = G.centers()[:, :, 0, :2]
    # u = 100 − 100·y/x ∈ [0, 200) ⇔ −x < y ≤ x; v = 100 − 100·0.5/x stays inside for x ≥ 0.5.
    x, y = c[..., 0], c[..., 1]
    expected = (x > 0.1) & (y <= x) & (y > -x)
    assert np.array_equal(m, expected)
    assert not frustum_mask(G, [], np.eye(4)).any()
