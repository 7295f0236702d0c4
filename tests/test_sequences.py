"""OccSequenceDataset: window counting, contents, relative ego poses, pooling, masks, latent hook."""
import math

import numpy as np
import pytest

from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, load_index, save_index
from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels
from occ_mfd.data.pool import pool_mask, pool_semantics
from occ_mfd.data.sequences import OccSequenceDataset, lidar_displacements, relative_poses
from occ_mfd.grid import GridSpec

SMALL = GridSpec((-4.0, -4.0, -1.0), (4.0, 4.0, 0.6), 0.4)  # 20 × 20 × 4


def pose(k: int) -> np.ndarray:
    """Frame k: yaw 0.1·k rad about z, position (k, 2k, 0.5)."""
    c, s = math.cos(0.1 * k), math.sin(0.1 * k)
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = [k, 2 * k, 0.5]
    return T


def frame_arrays(scene_i: int, k: int) -> OccFrame:
    rng = np.random.default_rng(1000 * scene_i + k)
    sem = np.where(rng.random(SMALL.shape) < 0.6, 17, rng.integers(0, 17, SMALL.shape)).astype(np.uint8)
    lidar = (rng.random(SMALL.shape) < 0.5).astype(np.uint8)
    cam = lidar & (rng.random(SMALL.shape) < 0.5).astype(np.uint8)
    return OccFrame(sem, lidar, cam)


SCENES = [("scene-a", "train", 12), ("scene-b", "train", 9), ("scene-c", "val", 10), ("scene-d", "train", 13)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    scenes = []
    for si, (name, split, n) in enumerate(SCENES):
        frames = []
        for k in range(n):
            tok = f"{name}-{k}"
            write_labels(labels_path(root, name, tok), frame_arrays(si, k), SMALL)
            frames.append(FrameEntry(tok, 1_500_000_000_000_000 + 500_000 * k, pose(k)))
        scenes.append(SceneEntry(name, split, frames))
    scenes[3].frames[8].extra["labels"] = False  # scene-d: frame 8 has no labels
    save_index(root, DatasetIndex(SMALL, scenes, {"type": "test"}))
    return root


def test_window_counts_by_hand(root):
    # P+F = 10. train: scene-a 12 → starts 0..2 (3); scene-b 9 → 0; scene-d 13 → starts 0..3 but frame 8
    # unlabelled kills every window covering it (starts 0..3 all cover 8) → 0.  val: scene-c 10 → 1.
    assert len(OccSequenceDataset(root, "train")) == 3
    assert len(OccSequenceDataset(root, "val")) == 1
    assert len(OccSequenceDataset(root, None)) == 4
    # stride 2: scene-a starts 0, 2 → 2.  P+F = 3: scene-a 10, scene-b 7, scene-d starts 0..10 minus those
    # covering 8 (6, 7, 8) → 8; total 25.
    assert len(OccSequenceDataset(root, "train", stride=2)) == 2
    assert len(OccSequenceDataset(root, "train", past=2, future=1)) == 10 + 7 + 8
    ds = OccSequenceDataset(root, "train", past=2, future=1)
    assert [(s, i) for s, i in ds.windows if s == 3] == [(3, i) for i in (0, 1, 2, 3, 4, 5, 9, 10)]


def test_zero_windows_error_names_root_and_split(root):
    with pytest.raises(ValueError) as e:
        OccSequenceDataset(root, "val", past=4, future=7)
    assert str(root) in str(e.value) and "'val'" in str(e.value)
    with pytest.raises(ValueError, match="'test'"):
        OccSequenceDataset(root, "test")


def test_item_contents_and_poses(root):
    ds = OccSequenceDataset(root, "train", mask="camera")
    assert ds.grid == SMALL and len(ds.index.scenes) == 4
    seq = ds[1]  # scene-a, frames 1..10, current frame = 4
    assert seq.scene == "scene-a" and seq.tokens == [f"scene-a-{k}" for k in range(1, 11)]
    assert seq.past.shape == (4, 20, 20, 4) and seq.future.shape == (6, 20, 20, 4)
    assert seq.past.dtype == np.uint8 and seq.future.dtype == np.uint8
    for j, k in enumerate(range(1, 11)):
        want = frame_arrays(0, k)
        got = seq.past[j] if j < 4 else seq.future[j - 4]
        np.testing.assert_array_equal(got, want.semantics)
        if j >= 4:
            np.testing.assert_array_equal(seq.mask_future[j - 4], want.mask_camera.astype(bool))
    assert seq.mask_future.dtype == bool
    # closed form: in frame c's ego frame, frame k has yaw 0.1(k-c) and position R(-0.1c)(t_k - t_c)
    c = 4
    assert seq.ego.shape == (10, 4, 4) and seq.ego.dtype == np.float32
    np.testing.assert_allclose(seq.ego[3], np.eye(4), atol=1e-6)
    for j, k in enumerate(range(1, 11)):
        dyaw, th = 0.1 * (k - c), -0.1 * c
        dx, dy = k - c, 2 * (k - c)
        want = np.eye(4)
        want[:2, :2] = [[math.cos(dyaw), -math.sin(dyaw)], [math.sin(dyaw), math.cos(dyaw)]]
        want[:2, 3] = [math.cos(th) * dx - math.sin(th) * dy, math.sin(th) * dx + math.cos(th) * dy]
        np.testing.assert_allclose(seq.ego[j], want, atol=1e-5)


def test_relative_poses_pure_translation():
    T = np.stack([np.eye(4)] * 3)
    T[:, :3, 3] = [[0, 0, 0], [1, 0, 0], [3, -2, 1]]
    rel = relative_poses(T, 1)
    np.testing.assert_allclose(rel[:, :3, 3], [[-1, 0, 0], [0, 0, 0], [2, -2, 1]])
    np.testing.assert_allclose(rel[:, :3, :3], np.stack([np.eye(3)] * 3))


def test_pool_and_lidar_mask(root):
    ds = OccSequenceDataset(root, "val", pool=2, mask="lidar")
    assert ds.grid.shape == (10, 10, 2) and ds.grid.voxel_size == pytest.approx(0.8)
    seq = ds[0]
    assert seq.past.shape == (4, 10, 10, 2) and seq.mask_future.shape == (6, 10, 10, 2)
    want = frame_arrays(2, 7)  # future[3] = frame 7 of scene-c
    np.testing.assert_array_equal(seq.future[3], pool_semantics(want.semantics, 2))
    np.testing.assert_array_equal(seq.mask_future[3], pool_mask(want.mask_lidar, 2).astype(bool))
    assert OccSequenceDataset(root, "val", mask=None)[0].mask_future is None
    with pytest.raises(ValueError, match="not divisible by pool=3"):
        OccSequenceDataset(root, "val", pool=3)


def test_frame_cache_returns_the_same_items_reads_each_frame_once_and_stays_within_budget(root, monkeypatch):
    import occ_mfd.data.sequences as sequences

    reads = []
    real = sequences.read_labels
    monkeypatch.setattr(sequences, "read_labels", lambda path, grid: reads.append(path) or real(path, grid))
    plain = OccSequenceDataset(root, "train", pool=2, mask="lidar")
    cached = OccSequenceDataset(root, "train", pool=2, mask="lidar", cache_mb=1.0)
    reads.clear()
    for i in range(len(cached)):
        a, b = plain[i], cached[i]
        np.testing.assert_array_equal(a.past, b.past)
        np.testing.assert_array_equal(a.future, b.future)
        np.testing.assert_array_equal(a.mask_future, b.mask_future)
    frames = {(seq.scene, tok) for seq in map(cached.__getitem__, range(len(cached))) for tok in seq.tokens}
    assert len(reads) == 10 * len(plain) + len(frames)         # the cached dataset read every frame once
    # A budget of three frames (pooled: 10·10·2 B semantics + 200 B mask each) keeps three and evicts the oldest.
    small = OccSequenceDataset(root, "train", pool=2, mask="lidar", cache_mb=3 * 400 / 2**20)
    tokens = small[0].tokens
    assert len(small._cache) == 3 and small._cached_bytes == 1200
    assert [t for _, t in small._cache] == tokens[-3:]


# --------------------------------------------------------------------------- LiDAR-frame trajectory (OccFM's)
def _lidar2ego() -> np.ndarray:
    """nuScenes-like LIDAR_TOP: x right, y forward (ego x forward, y left), at (0.94, 0, 1.84) in the ego frame."""
    L = np.eye(4)
    L[:3, :3] = [[0, 1, 0], [-1, 0, 0], [0, 0, 1]]   # columns: lidar x → ego −y, lidar y → ego x
    L[:3, 3] = [0.94, 0.0, 1.84]
    return L


def _arc_poses(n: int, step: float, dyaw: float) -> np.ndarray:
    """Ego poses that advance ``step`` m along their own x then turn ``dyaw`` rad, repeated (start at identity)."""
    out, T = [], np.eye(4)
    c, s = math.cos(dyaw), math.sin(dyaw)
    D = np.eye(4)
    D[:2, :2] = [[c, -s], [s, c]]
    D[0, 3] = step
    for _ in range(n):
        out.append(T.copy())
        T = T @ D
    return np.stack(out)


@pytest.mark.parametrize("step,dyaw", [(5.0, 0.0), (3.0, 0.2), (0.0, -0.3)])
def test_lidar_displacements_by_hand(step, dyaw):
    # Ego k+1 in ego k: rotation dyaw, origin (step, 0). The LiDAR origin (0.94, 0) of ego k+1 lands at
    # (step + 0.94 cos dyaw, 0.94 sin dyaw) in ego k; minus (0.94, 0), then ego (x, y) → lidar (−y, x).
    E = _arc_poses(4, step, dyaw)
    L = np.repeat(_lidar2ego()[None], 4, axis=0)
    d = lidar_displacements(E, L)
    expect = np.array([-0.94 * math.sin(dyaw), step + 0.94 * (math.cos(dyaw) - 1.0)])
    assert d.shape == (3, 2) and d.dtype == np.float32
    np.testing.assert_allclose(d, np.repeat(expect[None], 3, axis=0), atol=1e-5)


def test_lidar_displacements_are_independent_of_the_global_frame():
    E, L = _arc_poses(5, 2.0, 0.1), np.repeat(_lidar2ego()[None], 5, axis=0)
    G = np.eye(4)
    G[:2, :2] = [[math.cos(1.1), -math.sin(1.1)], [math.sin(1.1), math.cos(1.1)]]
    G[:3, 3] = [300.0, -42.0, 0.0]
    np.testing.assert_allclose(lidar_displacements(G @ E, L), lidar_displacements(E, L), atol=1e-4)


@pytest.mark.parametrize("n_frames", [5, 6])
def test_dataset_lidar_traj_rows_and_scene_end(tmp_path, n_frames):
    # P = 2, F = 3: the window covers frames 0..4; its last row is frame 4 → 5, zero when the scene ends at 4.
    E = _arc_poses(n_frames, 4.0, 0.05)
    frames = []
    for k in range(n_frames):
        write_labels(labels_path(tmp_path, "s", f"t{k}"), frame_arrays(0, k), SMALL)
        frames.append(FrameEntry(f"t{k}", 1_000_000 * (k + 1), E[k], {"lidar2ego": _lidar2ego().tolist()}))
    save_index(tmp_path, DatasetIndex(SMALL, [SceneEntry("s", "train", frames)], {"type": "test"}))
    item = OccSequenceDataset(tmp_path, "train", past=2, future=3)[0]
    full = lidar_displacements(E, np.repeat(_lidar2ego()[None], n_frames, axis=0))
    assert item.lidar_traj.shape == (5, 2)
    np.testing.assert_allclose(item.lidar_traj[:4], full[:4], atol=1e-5)
    if n_frames == 5:
        assert np.all(item.lidar_traj[4] == 0)
    else:
        np.testing.assert_allclose(item.lidar_traj[4], full[4], atol=1e-5)
        assert abs(item.lidar_traj[4, 1]) > 3.0  # forward motion is LiDAR +y


def test_dataset_without_lidar2ego_has_no_lidar_traj(root):
    assert OccSequenceDataset(root, "val")[0].lidar_traj is None


def test_index_rejects_a_malformed_lidar2ego(tmp_path):
    frame = FrameEntry("t0", 1, np.eye(4), {"lidar2ego": [[1, 0], [0, 1]]})
    save_index(tmp_path, DatasetIndex(SMALL, [SceneEntry("s", "train", [frame])], {"type": "test"}))
    with pytest.raises(ValueError, match="frame 0: 'lidar2ego' must be a finite 4×4"):
        load_index(tmp_path)
