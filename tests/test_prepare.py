"""The prepare job end to end on a tiny synthetic world: quality vs truth, resume, shards, bad input."""
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from occ_mfd.data import prepare
from occ_mfd.data.index import load_index
from occ_mfd.data.nuscenes import NuScenesSource
from occ_mfd.data.occ3d import labels_path, read_labels
from occ_mfd.data.occ3d_import import verify_dataset
from occ_mfd.data.occupancy.quality import compare_to_truth
from occ_mfd.data.prepare import GRID_PRESETS, PrepareConfig, SceneResult, run_prepare, shard_scenes
from occ_mfd.grid import category_to_occ3d

V = "v1.0-synth"
SMALL = PrepareConfig(grid=GRID_PRESETS["occ3d-0.8"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from occ_mfd.data.synthetic.world import make_world
    root = tmp_path_factory.mktemp("world")
    make_world(root, version=V, scenes=2, keyframes=10, sweeps_per_keyframe=2, seed=3, truth=True,
               progress=False)
    return root


@pytest.fixture(scope="module")
def src(world):
    return NuScenesSource(world, V)


def _frames(out):
    idx = load_index(out)
    return {(s.name, f.token): read_labels(labels_path(out, s.name, f.token)) for s in idx.scenes for f in s.frames}


@pytest.mark.slow
def _assert_lidar2ego_recorded(idx, src):
    """Every keyframe's LIDAR_TOP calibration is in the index, as the source has it (LiDAR-frame trajectories)."""
    for s in idx.scenes:
        by_token = {kf.token: kf for kf in src.scene(s.name).keyframes}
        for f in s.frames:
            np.testing.assert_allclose(f.lidar2ego, by_token[f.token].lidar.sensor2ego, atol=1e-12)


def test_quality_against_truth(world, src, tmp_path):
    out = tmp_path / "o"
    run_prepare(world, V, out, PrepareConfig(), scenes=["scene-0002"], workers=1, progress=False, src=src)
    boxes = {kf.token: kf.boxes for kf in src.scene("scene-0002").keyframes}
    q = compare_to_truth(out, world / "truth", boxes)
    print(q.summary())
    assert q.frames == 10
    _assert_lidar2ego_recorded(load_index(out), src)
    # Measured on this scene (world seed 3, scene-0002): IoU 0.853, mIoU 0.626, 0 trail voxels of 27,275.
    assert q.iou >= 0.80
    assert q.miou >= 0.55
    assert q.dynamic_voxels > 100 and q.trail_pct <= 1.0


def test_resume_restores_deleted_frame_and_cleans_temp(world, src, tmp_path):
    out = tmp_path / "o"
    r1 = run_prepare(world, V, out, SMALL, workers=1, progress=False, src=src)
    assert r1["written"] == 20 and r1["skipped"] == 0
    before = _frames(out)
    keys = sorted(before)
    labels_path(out, *keys[3]).unlink()
    fake = labels_path(out, *keys[7]).parent / "labels.npz.abc123.tmp.npz"
    fake.write_bytes(b"half a file")
    r2 = run_prepare(world, V, out, SMALL, workers=1, progress=False, src=src)
    assert r2["written"] == 1 and r2["skipped"] == 19
    after = _frames(out)
    for k in keys:
        for name in ("semantics", "mask_lidar", "mask_camera"):
            assert np.array_equal(getattr(before[k], name), getattr(after[k], name))
    assert not fake.exists()
    rep = verify_dataset(out, progress=False)
    assert rep.ok and rep.num_checked == 20


def test_shard_union_equals_full_run(world, src, tmp_path):
    cfg = PrepareConfig(grid=GRID_PRESETS["occ3d-0.8"], use_sweeps=False)
    full, sh = tmp_path / "full", tmp_path / "sh"
    run_prepare(world, V, full, cfg, workers=1, progress=False, src=src)
    r0 = run_prepare(world, V, sh, cfg, workers=1, shard=(0, 2), progress=False, src=src)
    assert not (sh / "index.json").exists()  # one shard alone does not make the index
    r1 = run_prepare(world, V, sh, cfg, workers=1, shard=(1, 2), progress=False, src=src)
    assert r0["scenes"] == r1["scenes"] == 1
    assert load_index(sh).to_dict() == load_index(full).to_dict()
    a, b = _frames(full), _frames(sh)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].semantics, b[k].semantics) and np.array_equal(a[k].mask_lidar, b[k].mask_lidar)
               for k in a)


def test_shard_split_is_a_partition():
    names = [f"scene-{i:04d}" for i in range(11)]
    parts = [shard_scenes(names[::-1], (k, 3)) for k in range(3)]
    assert sorted(sum(parts, [])) == names and parts[0] == ["scene-0000", "scene-0003", "scene-0006", "scene-0009"]
    with pytest.raises(ValueError):
        shard_scenes(names, (3, 3))


def test_keyframes_only_without_lidarseg(world, tmp_path):
    root = tmp_path / "nolseg"
    shutil.copytree(world / V, root / V, ignore=shutil.ignore_patterns("lidarseg.json"))
    for sub in ("samples", "sweeps", "maps"):
        (root / sub).symlink_to(world / sub)
    src = NuScenesSource(root, V)
    assert not src.has_lidarseg
    out = tmp_path / "o"
    cfg = PrepareConfig(grid=GRID_PRESETS["occ3d-0.8"], use_sweeps=False)
    run_prepare(root, V, out, cfg, scenes=["scene-0001"], workers=1, progress=False, src=src)
    box_classes = {category_to_occ3d(c["name"]) for c in src.nusc.category}
    labels = set()
    for f in _frames(out).values():
        labels |= set(np.unique(f.semantics).tolist())
    assert 0 in labels and labels <= box_classes | {0, 17}
    assert load_index(out).source["lidarseg"] is False


def test_bad_sweep_named_or_skipped(world, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(world, root, ignore=shutil.ignore_patterns("truth"))
    src = NuScenesSource(root, V)
    sc = src.scene("scene-0002")
    bad = sc.keyframes[2].lidar.path
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(ValueError, match=bad.name):
        run_prepare(root, V, tmp_path / "o1", SMALL, scenes=["scene-0002"], workers=1, progress=False, src=src)
    assert not list((tmp_path / "o1").rglob("*.tmp*"))
    res = run_prepare(root, V, tmp_path / "o2", SMALL, scenes=["scene-0002"], workers=1, skip_bad=True,
                      progress=False, src=src)
    assert res["bad"] == 1 and bad.name in res["bad_messages"][0] and res["written"] == 10


def test_cli_occ3d_source_and_verify(world, tmp_path, capsys):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("prepare_cli", Path(__file__).parents[1] / "tools/prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "occ3d"
    # The synthetic truth is laid out like downloaded Occ3D labels: index it instead of generating.
    rc = cli.main(["--source", "occ3d", "--occ3d-root", str(world / "truth"), "--dataroot", str(world),
                   "--version", V, "--out", str(out)])
    assert rc == 0
    idx = load_index(out)
    assert idx.num_frames == 20 and {s.split for s in idx.scenes} == {"train", "val"}
    _assert_lidar2ego_recorded(idx, NuScenesSource(world, V))
    assert verify_dataset(out, progress=False).num_checked == 20
    assert cli.main(["verify", str(tmp_path / "nothing")]) == 2
    assert "index.json not found" in capsys.readouterr().err


def test_parallel_run_matches_serial(world, src, tmp_path):
    """workers=2 (worker processes) writes the same files and index as workers=1 (this process)."""
    cfg = PrepareConfig(grid=GRID_PRESETS["occ3d-0.8"], use_sweeps=False)
    serial, par = tmp_path / "serial", tmp_path / "par"
    run_prepare(world, V, serial, cfg, workers=1, progress=False, src=src)
    r = run_prepare(world, V, par, cfg, workers=2, progress=False, src=src)
    assert r["scenes"] == 2 and r["written"] == 20 and r["bad"] == 0
    assert load_index(par).to_dict() == load_index(serial).to_dict()
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("labels.npz"))
    assert files(par) == files(serial) and len(files(par)) == 20
    assert all((par / f).read_bytes() == (serial / f).read_bytes() for f in files(par))


def _report_worker(src, name, out, cfg, skip_bad=False, max_frames=None):
    """Stand-in for prepare_scene in forked workers: reports, as its one 'bad' message, the worker's
    dataroot, its OMP_NUM_THREADS and the largest thread pool of any numeric library it has loaded."""
    most = max(d["num_threads"] for d in threadpool_info())
    return SceneResult(name, None, bad=[f"{src.dataroot}|{os.environ.get('OMP_NUM_THREADS')}|{most}"])


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="the stand-in reaches workers by fork")
def test_parallel_calls_use_their_own_source_and_thread_limits(world, tmp_path, monkeypatch):
    """Two parallel runs in one process: each one's workers see that call's dataroot (nothing kept from
    the first call) and run single-threaded (OMP_NUM_THREADS=1, every loaded thread pool at 1 thread);
    the parent's environment is left as it was, and a user's OMP_NUM_THREADS is honoured."""
    other = tmp_path / "other"                 # a second dataroot: same tables, another path
    shutil.copytree(world / V, other / V)
    for sub in world.iterdir():
        if sub.name != V:
            (other / sub.name).symlink_to(sub)
    monkeypatch.setattr(prepare, "prepare_scene", _report_worker)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for root in (world, other):
        res = run_prepare(root, V, tmp_path / "o", SMALL, workers=2, progress=False, skip_bad=True)
        assert res["scenes"] == 2 and res["bad_messages"] == [f"{root}|1|1"] * 2
        assert "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    res = run_prepare(other, V, tmp_path / "o", SMALL, workers=2, progress=False, skip_bad=True)
    assert res["bad_messages"] == [f"{other}|2|2"] * 2 and os.environ["OMP_NUM_THREADS"] == "2"


def test_dry_run_estimate_is_setup_plus_the_schedule(world, src):
    """The estimate's arithmetic: with as many scenes as workers a scene is the unit of parallel work (2 workers
    run the 2 scenes at a time); with more workers than scenes the scenes go one after another, each accumulated
    once and its keyframes shared out (within_scene). Three keyframes (first, middle, last) of the first scene
    are timed; nothing is written."""
    before = sorted(p.name for p in world.iterdir())
    nkf = [s["nbr_samples"] for s in src.nusc.scene]
    est = prepare.dry_run(world, V, SMALL, workers=2, src=src)
    assert est["keyframes"] == sum(nkf) and est["scenes"] == 2 and est["parallel_scenes"] == 2
    assert not est["within_scene"]
    assert est["keyframes_timed"] == 3 and est["setup_seconds"] < 0.5       # the source was handed in: no load
    assert est["seconds_per_keyframe"] == pytest.approx(est["accumulate_seconds_per_keyframe"]
                                                        + est["label_seconds_per_keyframe"])
    expect = est["setup_seconds"] + est["seconds_per_keyframe"] * max(sum(nkf) / 2, max(nkf))
    assert est["estimated_seconds"] == pytest.approx(expect) and est["estimated_hours"] == pytest.approx(expect / 3600)
    four = prepare.dry_run(world, V, SMALL, workers=4, src=src)
    assert four["within_scene"] and four["parallel_scenes"] == 1
    acc, lab = four["accumulate_seconds_per_keyframe"], four["label_seconds_per_keyframe"]
    expect = four["setup_seconds"] + sum(acc * n + -(-n // 4) * lab for n in nkf)      # ⌈n / 4⌉ keyframes each
    assert four["estimated_seconds"] == pytest.approx(expect)
    one = prepare.dry_run(world, V, SMALL, workers=1, scenes=[src.scene_names()[0]], src=src)
    assert one["parallel_scenes"] == 1 and one["keyframes"] == nkf[0] and not one["within_scene"]
    assert sorted(p.name for p in world.iterdir()) == before


def test_within_scene_parallel_matches_serial(world, src, tmp_path):
    """More workers than scenes: one scene's keyframes shared out to 2 forked workers write byte-identical files
    (and the same index) as one process; a second run finds everything done."""
    serial, par = tmp_path / "serial", tmp_path / "par"
    run_prepare(world, V, serial, SMALL, scenes=["scene-0001"], workers=1, progress=False, src=src)
    r = run_prepare(world, V, par, SMALL, scenes=["scene-0001"], workers=2, progress=False, src=src)
    assert r["written"] == 10 and r["skipped"] == 0 and r["bad"] == 0
    assert load_index(par).to_dict() == load_index(serial).to_dict()
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("labels.npz"))
    assert files(par) == files(serial) and len(files(par)) == 10
    assert all((par / f).read_bytes() == (serial / f).read_bytes() for f in files(par))
    again = run_prepare(world, V, par, SMALL, scenes=["scene-0001"], workers=2, progress=False, src=src)
    assert again["written"] == 0 and again["skipped"] == 10


def test_kill9_during_within_scene_parallel_run_then_rerun_is_identical(world, src, tmp_path):
    """kill -9 of the whole process group (the parent and its keyframe workers) while a scene's keyframes are
    being written by 2 workers, then the same command again: voxel-identical to an uninterrupted serial run,
    no temp file left, and the folder verifies."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    ref, out = tmp_path / "ref", tmp_path / "o"
    run_prepare(world, V, ref, PrepareConfig(), scenes=["scene-0002"], workers=1, progress=False, src=src)
    cmd = [sys.executable, str(repo / "tools/prepare_data.py"), "--dataroot", str(world), "--version", V,
           "--out", str(out), "--scenes", "scene-0002", "--workers", "2"]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(out.rglob("labels.npz")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)            # the group: the parent and the forked keyframe workers
    p.wait()
    done = len(list(out.rglob("labels.npz")))
    assert 1 <= done < 10, f"the kill should land mid-scene ({done} of 10 frames were written)"
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    a, b = _frames(ref), _frames(out)
    assert a.keys() == b.keys() and len(a) == 10
    for k in a:
        for name in ("semantics", "mask_lidar", "mask_camera"):
            assert np.array_equal(getattr(a[k], name), getattr(b[k], name)), (k, name)
    assert not list(out.rglob("*.tmp*"))
    assert verify_dataset(out, progress=False).ok
