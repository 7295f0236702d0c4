"""Occ3D label I/O, index.json, pooling and the Occ3D import / verify path."""
import json
import os

import numpy as np
import pytest

from occ_mfd.data import occ3d as occ3d_mod
from occ_mfd.data.index import (DatasetIndex, FrameEntry, SceneEntry, load_index, merge_indexes,
                                save_index)
from occ_mfd.data.occ3d import LABEL_KEYS, OccFrame, labels_path, read_labels, write_labels
from occ_mfd.data.occ3d_import import build_occ3d_index, verify_dataset
from occ_mfd.data.pool import pool_mask, pool_semantics
from occ_mfd.grid import OCC3D_CLASSES, OCC3D_GRID, GridSpec

SMALL = GridSpec((-4.0, -4.0, -1.0), (4.0, 4.0, 0.6), 0.4)  # 20 × 20 × 4
REAL_REL = "CVPR2023-3D-Occupancy-Prediction/data/29796060110c4163b07f06eff4af0753/labels.npz"


def random_frame(rng, shape=SMALL.shape) -> OccFrame:
    lidar = (rng.random(shape) < 0.6).astype(np.uint8)
    return OccFrame(rng.integers(0, 18, shape, dtype=np.uint8), lidar,
                    lidar & (rng.random(shape) < 0.5).astype(np.uint8))


# ----------------------------------------------------------------------------------------- labels

def test_labels_path_layout(tmp_path):
    assert labels_path(tmp_path, "scene-0001", "abc") == tmp_path / "gts" / "scene-0001" / "abc" / "labels.npz"


def test_write_read_roundtrip_and_plain_npz(tmp_path):
    rng = np.random.default_rng(0)
    fr = random_frame(rng)
    p = write_labels(labels_path(tmp_path, "s", "t"), fr, SMALL)
    back = read_labels(p, SMALL)
    for k in LABEL_KEYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(fr, k))
    # An Occ3D reader sees exactly the three keys, and nothing else is left in the folder.
    with np.load(p) as z:
        assert sorted(z.files) == sorted(LABEL_KEYS)
    assert os.listdir(p.parent) == ["labels.npz"]


def _save_raw(path, **arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.mark.parametrize("change, needle", [
    (lambda d: d.pop("mask_camera"), "missing key"),
    (lambda d: d.update(semantics=np.zeros((20, 20, 8), np.uint8)), "'semantics' has shape (20, 20, 8), expected (20, 20, 4)"),
    (lambda d: d.update(mask_lidar=d["mask_lidar"].astype(np.int32)), "'mask_lidar' has dtype int32"),
    (lambda d: d.update(semantics=np.full((20, 20, 4), 18, np.uint8)), "holds value 18"),
    (lambda d: d.update(mask_camera=np.full((20, 20, 4), 2, np.uint8)), "'mask_camera' holds value 2"),
])
def test_read_rejects_bad_files_naming_them(tmp_path, change, needle):
    fr = random_frame(np.random.default_rng(1))
    d = {k: getattr(fr, k) for k in LABEL_KEYS}
    change(d)
    p = _save_raw(tmp_path / "x" / "labels.npz", **d)
    with pytest.raises(ValueError) as e:
        read_labels(p, SMALL)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_bool_masks_and_file_mode(tmp_path):
    fr = random_frame(np.random.default_rng(7))
    lidar = fr.mask_lidar.copy()
    fr.mask_lidar = fr.mask_lidar.astype(bool)
    p = write_labels(tmp_path / "labels.npz", fr, SMALL)
    back = read_labels(p, SMALL)
    assert back.mask_lidar.dtype == np.uint8 and np.array_equal(back.mask_lidar, lidar)
    umask = os.umask(0o022)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600


def test_read_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        read_labels(tmp_path / "nope.npz")
    p = write_labels(tmp_path / "labels.npz", random_frame(np.random.default_rng(2)), SMALL)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as e:
        read_labels(p)
    assert str(p) in str(e.value)
    p.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=str(p).replace(".", r"\.")):
        read_labels(p)


def test_write_validates_before_touching_disk(tmp_path):
    fr = random_frame(np.random.default_rng(3))
    fr.semantics = fr.semantics.astype(np.int64)
    with pytest.raises(ValueError, match="dtype int64"):
        write_labels(tmp_path / "a" / "labels.npz", fr, SMALL)
    assert not (tmp_path / "a").exists()


def test_interrupted_write_keeps_old_file_and_no_tmp(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    old, new = random_frame(rng), random_frame(rng)
    p = write_labels(tmp_path / "labels.npz", old, SMALL)

    real = np.savez_compressed

    def dies_halfway(f, **arrays):
        real(f, **arrays)  # bytes hit the temp file ...
        raise KeyboardInterrupt("killed")  # ... then the process is "killed" before the rename

    monkeypatch.setattr(occ3d_mod.np, "savez_compressed", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        write_labels(p, new, SMALL)
    np.testing.assert_array_equal(read_labels(p, SMALL).semantics, old.semantics)
    assert os.listdir(tmp_path) == ["labels.npz"]


def test_real_occ3d_frame(real_root):
    p = real_root / REAL_REL
    if not p.is_file():
        pytest.skip(f"{p} absent")
    fr = read_labels(p, OCC3D_GRID)
    assert fr.semantics.shape == (200, 200, 16) and fr.semantics.dtype == np.uint8
    assert set(np.unique(fr.semantics)) <= set(range(18))
    assert set(np.unique(fr.mask_lidar)) <= {0, 1} and set(np.unique(fr.mask_camera)) <= {0, 1}
    assert not np.any((fr.mask_camera == 1) & (fr.mask_lidar == 0))  # camera ⊂ lidar
    # a real frame has ground and thousands of occupied voxels
    assert (fr.semantics != 17).sum() > 1000 and 11 in np.unique(fr.semantics)
    with pytest.raises(ValueError, match="expected \\(100, 100, 8\\)"):
        read_labels(p, OCC3D_GRID.pooled(2))


# ------------------------------------------------------------------------------------------ index

def make_index(n_frames=(3, 2), grid=SMALL, seed=0) -> DatasetIndex:
    rng = np.random.default_rng(seed)
    scenes = []
    for si, n in enumerate(n_frames):
        frames = []
        for k in range(n):
            pose = np.eye(4)
            pose[:3, 3] = rng.normal(size=3)
            frames.append(FrameEntry(f"tok{si}_{k}", 1_000_000 + 500_000 * k, pose))
        scenes.append(SceneEntry(f"scene-{si:04d}", "train" if si % 2 == 0 else "val", frames))
    return DatasetIndex(grid, scenes, {"type": "test"})


def test_index_roundtrip_and_extras(tmp_path):
    idx = make_index()
    idx.scenes[0].frames[1].extra["labels"] = False
    idx.extra["note"] = "kept"
    save_index(tmp_path, idx)
    d = json.loads((tmp_path / "index.json").read_text())
    assert d["free_id"] == 17 and d["classes"] == list(OCC3D_CLASSES) and d["grid"]["shape"] == [20, 20, 4]
    back = load_index(tmp_path)
    assert back.grid == SMALL and back.source == {"type": "test"} and back.extra == {"note": "kept"}
    assert [s.name for s in back.scenes] == ["scene-0000", "scene-0001"]
    for a, b in zip(idx.scenes, back.scenes):
        assert a.split == b.split and [f.token for f in a.frames] == [f.token for f in b.frames]
        for fa, fb in zip(a.frames, b.frames):
            np.testing.assert_array_equal(fa.ego2global, fb.ego2global)
            assert fa.timestamp == fb.timestamp
    assert back.scenes[0].frames[1].has_labels is False and back.scenes[0].frames[0].has_labels
    assert [f for f in os.listdir(tmp_path)] == ["index.json"]


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["classes"].reverse(), "'classes'"),
    (lambda d: d.update(free_id=0), "'free_id' is 0"),
    (lambda d: d["grid"].update(voxel_size=0.3), "'grid' does not parse"),
    (lambda d: d["scenes"][0]["frames"][2].update(timestamp=1), "time order"),
    (lambda d: d["scenes"][0]["frames"][0].update(ego2global=[[1, 0], [0, 1]]), "4×4"),
    (lambda d: d["scenes"][1].pop("split"), "'split'"),
])
def test_index_validation_names_file(tmp_path, edit, needle):
    d = make_index().to_dict()
    edit(d)
    (tmp_path / "index.json").write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        load_index(tmp_path)
    assert str(tmp_path / "index.json") in str(e.value) and needle in str(e.value)


def test_index_interrupted_save_keeps_old(tmp_path, monkeypatch):
    save_index(tmp_path, make_index((3,)))

    def killed(*a, **k):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_index(tmp_path, make_index((5,)))
    monkeypatch.undo()
    assert [len(s.frames) for s in load_index(tmp_path).scenes] == [3]
    assert os.listdir(tmp_path) == ["index.json"]


def test_index_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_index(tmp_path)
    save_index(tmp_path, make_index())
    p = tmp_path / "index.json"
    p.write_text(p.read_text()[:50])
    with pytest.raises(ValueError, match="not valid JSON"):
        load_index(tmp_path)


def test_merge_indexes():
    full = make_index((3, 2, 4))
    a = DatasetIndex(SMALL, full.scenes[:2], full.source)
    b = DatasetIndex(SMALL, full.scenes[1:], full.source)  # scene 1 in both, identical
    m = merge_indexes([a, b])
    assert [s.name for s in m.scenes] == ["scene-0000", "scene-0001", "scene-0002"]
    conflict = make_index((3, 2, 4), seed=1)  # same names, other poses
    with pytest.raises(ValueError, match="scene 'scene-0000' differs"):
        merge_indexes([a, DatasetIndex(SMALL, conflict.scenes[:1])])
    with pytest.raises(ValueError, match="grid mismatch"):
        merge_indexes([a, DatasetIndex(SMALL.pooled(2), [])])


# ---------------------------------------------------------------------------------------- pooling

def pool_semantics_loop(sem, f):
    X, Y, Z = (n // f for n in sem.shape)
    out = np.empty((X, Y, Z), np.uint8)
    for i in range(X):
        for j in range(Y):
            for k in range(Z):
                block = sem[i*f:(i+1)*f, j*f:(j+1)*f, k*f:(k+1)*f].ravel()
                occ = block[block != 17]
                if occ.size == 0:
                    out[i, j, k] = 17
                else:
                    vals, cnt = np.unique(occ, return_counts=True)  # sorted: first max = smallest id
                    out[i, j, k] = vals[np.argmax(cnt)]
    return out


@pytest.mark.parametrize("factor", [2, 4])
def test_pool_semantics_vs_loop(factor):
    rng = np.random.default_rng(factor)
    # mostly free with a few classes, so all-free blocks, ties and majorities all occur
    sem = np.where(rng.random((8, 8, 8)) < 0.7, 17, rng.integers(0, 4, (8, 8, 8))).astype(np.uint8)
    np.testing.assert_array_equal(pool_semantics(sem, factor), pool_semantics_loop(sem, factor))


def test_pool_hand_cases():
    sem = np.full((2, 2, 2), 17, np.uint8)
    assert pool_semantics(sem, 2)[0, 0, 0] == 17
    sem[0, 0, 0] = 9
    assert pool_semantics(sem, 2)[0, 0, 0] == 9          # one occupied child beats 7 free ones
    sem[1, 1, 1] = 4
    assert pool_semantics(sem, 2)[0, 0, 0] == 4          # tie 1:1 → smallest id
    sem[0, 1, 0] = sem[1, 0, 0] = 9
    assert pool_semantics(sem, 2)[0, 0, 0] == 9          # 3:1 majority
    m = np.zeros((4, 2, 2), np.uint8)
    m[3, 1, 1] = 1
    np.testing.assert_array_equal(pool_mask(m, 2)[:, 0, 0], [0, 1])
    with pytest.raises(ValueError, match="not divisible"):
        pool_semantics(np.zeros((3, 2, 2), np.uint8), 2)


# ----------------------------------------------------------------------------- import and verify

def occ3d_like(tmp_path, real_file=None):
    """R/gts/<scene>/<token>/labels.npz for 2 scenes; scene-a misses token a2, scene-c has no files."""
    R = tmp_path / "occ3d"
    rng = np.random.default_rng(5)
    frames = {"scene-a": [(f"a{k}", 10 + k, np.eye(4)) for k in range(4)],
              "scene-b": [(f"b{k}", 10 + k, np.eye(4)) for k in range(2)],
              "scene-c": [("c0", 1, np.eye(4))]}
    for scene, fr in frames.items():
        for tok, _, _ in fr:
            if scene == "scene-c" or tok == "a2":
                continue
            p = labels_path(R, scene, tok)
            if real_file is not None:
                p.parent.mkdir(parents=True)
                p.symlink_to(real_file)
            else:
                write_labels(p, random_frame(rng, OCC3D_GRID.shape))
    (R / "gts" / "scene-zzz").mkdir()
    return R, frames


def test_build_occ3d_index_reports_missing_and_bad(tmp_path):
    R, frames = occ3d_like(tmp_path)
    bad = labels_path(R, "scene-b", "b1")
    _save_raw(bad, semantics=np.zeros((200, 200, 8), np.uint8), mask_lidar=np.zeros((200, 200, 8), np.uint8),
              mask_camera=np.zeros((200, 200, 8), np.uint8))
    idx, rep = build_occ3d_index(R, frames, {"scene-a": "train", "scene-b": "val", "scene-c": "train"},
                                 {"version": "v1.0-test"}, progress=False)
    assert rep.num_frames == 7 and rep.num_valid == 4
    assert rep.missing == [("scene-a", "a2"), ("scene-c", "c0")]
    assert len(rep.bad) == 1 and rep.bad[0][0] == str(bad) and "expected (200, 200, 16)" in rep.bad[0][1]
    assert rep.dropped_scenes == ["scene-c"] and rep.unknown_scenes == ["scene-zzz"]
    assert "missing: 2 frame(s)" in rep.summary() and not rep.ok
    assert [s.name for s in idx.scenes] == ["scene-a", "scene-b"]
    assert [f.has_labels for f in idx.scenes[0].frames] == [True, True, False, True]
    assert idx.source["type"] == "occ3d" and idx.source["version"] == "v1.0-test"
    # the index written next to the labels verifies; the declared-missing frames are not errors
    save_index(R, idx)
    v = verify_dataset(R, progress=False)
    assert v.num_checked == 4 and v.declared_missing == 2 and v.ok, v.summary()


def test_build_occ3d_index_on_real_frame(tmp_path, real_root):
    real = real_root / REAL_REL
    if not real.is_file():
        pytest.skip(f"{real} absent")
    R, frames = occ3d_like(tmp_path, real_file=real)
    idx, rep = build_occ3d_index(R, frames, dict.fromkeys(frames, "train"), progress=False)
    assert rep.num_valid == 5 and rep.missing == [("scene-a", "a2"), ("scene-c", "c0")] and not rep.bad


def test_verify_dataset_finds_problems(tmp_path):
    idx = make_index((2, 2))
    rng = np.random.default_rng(6)
    for s in idx.scenes:
        for f in s.frames:
            write_labels(labels_path(tmp_path, s.name, f.token), random_frame(rng), SMALL)
    save_index(tmp_path, idx)
    v = verify_dataset(tmp_path, progress=False)
    assert v.ok and v.num_checked == 4 and v.num_scenes == 2
    labels_path(tmp_path, "scene-0000", "tok0_0").unlink()
    bad = labels_path(tmp_path, "scene-0001", "tok1_1")
    fr = read_labels(bad)
    fr.mask_lidar[0, 0, 0] = 3
    _save_raw(bad, **{k: getattr(fr, k) for k in LABEL_KEYS})
    (bad.parent / "labels.npz.x1.tmp.npz").write_bytes(b"partial")
    v = verify_dataset(tmp_path, progress=False)
    assert not v.ok and v.num_checked == 2
    assert v.missing == [("scene-0000", "tok0_0")]
    assert len(v.bad) == 1 and "'mask_lidar' holds value 3" in v.bad[0][1]
    assert v.tmp_files == [str(bad.parent / "labels.npz.x1.tmp.npz")]
    with pytest.raises(ValueError, match="grid mismatch"):
        verify_dataset(tmp_path, grid=OCC3D_GRID, progress=False)
