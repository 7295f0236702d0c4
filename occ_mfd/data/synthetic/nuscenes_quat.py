"""Rotation matrices ↔ nuScenes quaternions ([w, x, y, z], as the tables store them).

Our own conversion (not pyquaternion's ``Quaternion(matrix=...)``, which rejects matrices that are
orthogonal only to float32 precision) with a fixed sign convention (w ≥ 0), so the same pose always
gives the same JSON bytes.
"""
from __future__ import annotations

import math

import numpy as np


def matrix_to_quat_wxyz(rot: np.ndarray) -> list[float]:
    """(3, 3) rotation matrix → unit quaternion [w, x, y, z] with w ≥ 0 (Shepperd's method)."""
    m = np.asarray(rot, dtype=np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"matrix_to_quat_wxyz: need a (3, 3) matrix, got {m.shape}")
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    # Branch on the largest of (trace, diagonal) so the square root never sees a tiny number.
    if tr > max(m[0, 0], m[1, 1], m[2, 2]):
        s = 2.0 * math.sqrt(1.0 + tr)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] >= m[1, 1] and m[0, 0] >= m[2, 2]:
        s = 2.0 * math.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 1e-300))
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] >= m[2, 2]:
        s = 2.0 * math.sqrt(max(1.0 + m[1, 1] - m[0, 0] - m[2, 2], 1e-300))
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = 2.0 * math.sqrt(max(1.0 + m[2, 2] - m[0, 0] - m[1, 1], 1e-300))
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    if q[0] < 0:
        q = -q
    return [float(v) for v in q]


def yaw_to_quat_wxyz(yaw: float) -> list[float]:
    """Rotation by ``yaw`` radians about +z → [w, x, y, z] with w ≥ 0."""
    q = [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]
    return [-v for v in q] if q[0] < 0 else [float(v) for v in q]
