"""Runner + report: perfect / copy-last rows score 100, deterministic noise, masks, dumps, JSON/CSV shape."""
import json
import math

import numpy as np
import pytest
import torch

from occ_mfd.data.index import DatasetIndex, FrameEntry, SceneEntry, save_index
from occ_mfd.data.occ3d import OccFrame, labels_path, write_labels
from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.eval.baselines import CopyLast, WarpLast
from occ_mfd.eval.forecasters import Forecast
from occ_mfd.eval.metrics import OccMetrics
from occ_mfd.eval.report import format_header, format_table, protocol_header, results_dict, write_csv, write_json
from occ_mfd.eval.runner import run_eval
from occ_mfd.grid import FREE_ID, GridSpec

G = GridSpec((-2.0, -2.0, -0.4), (2.0, 2.0, 0.4), 0.4)   # 10 × 10 × 2


def make_dataset(root, static: bool, n_frames: int = 11):
    """One val scene. static: every frame identical with identity poses. Else random frames moving in x.
    Classes present: 0..4 and free only (so classes 5..16 are absent → NaN/null)."""
    frames = []
    for k in range(n_frames):
        rng = np.random.default_rng(0 if static else k)
        sem = np.where(rng.random(G.shape) < 0.5, FREE_ID, rng.integers(0, 5, G.shape)).astype(np.uint8)
        cam = (rng.random(G.shape) < 0.5).astype(np.uint8)
        write_labels(labels_path(root, "s0", f"t{k}"), OccFrame(sem, np.ones_like(cam), cam), G)
        pose = np.eye(4)
        pose[0, 3] = 0.0 if static else 0.4 * k
        frames.append(FrameEntry(f"t{k}", 1_000_000 + 500_000 * k, pose))
    save_index(root, DatasetIndex(G, [SceneEntry("s0", "val", frames)], {"type": "test"}))
    return root


class Perfect:
    name, steps = "perfect", 1

    def __call__(self, batch, generator=None):
        return Forecast(classes=batch.future.clone(), nfe=1)


class Noisy:
    """Prediction = ground truth with voxels flipped to free where the generator's noise < 0.3."""

    steps = 3

    def __init__(self, name):
        self.name = name

    def __call__(self, batch, generator=None):
        u = torch.rand(batch.future.shape, generator=generator).to(batch.future.device)
        return Forecast(classes=torch.where(u < 0.3, FREE_ID, batch.future), nfe=3)


class WrongOutsideCamera:
    name, steps = "wrong-outside-mask", 0

    def __call__(self, batch, generator=None):
        return Forecast(classes=torch.where(batch.mask_future, batch.future, (batch.future + 1) % 18), nfe=0)


@pytest.fixture(scope="module")
def moving(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("moving"), static=False)


@pytest.fixture(scope="module")
def static(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("static"), static=True)


def test_perfect_and_copy_last_score_100(moving, static):
    ds = OccSequenceDataset(moving, "val", mask=None)
    assert len(ds) == 2
    (perfect,) = run_eval(ds, [Perfect()], grid=G, batch_size=2, progress=False)
    m = perfect.metrics
    assert np.allclose(m.iou, 100) and np.allclose(m.miou, 100) and m.miou_mean_123 == 100 == m.iou_mean_all
    assert perfect.nfe == 1
    assert np.isnan(m.per_class_iou[:, 5:]).all()       # absent classes excluded, not 1
    ds_static = OccSequenceDataset(static, "val", mask=None)
    copy, warp = run_eval(ds_static, [CopyLast(), WarpLast(G)], grid=G, progress=False)
    for row in (copy, warp):
        assert np.allclose(row.metrics.iou, 100) and np.allclose(row.metrics.miou, 100)


def test_copy_last_matches_direct_metric_and_mask(moving):
    ds = OccSequenceDataset(moving, "val", mask="camera")
    (row, masked) = run_eval(ds, [CopyLast(), WrongOutsideCamera()], grid=G, batch_size=1, progress=False)
    ref = OccMetrics()
    for i in range(len(ds)):
        s = ds[i]
        gt = torch.from_numpy(s.future).long()[None]
        ref.update(gt.new_tensor(s.past[-1]).long()[None, None].expand_as(gt), gt,
                   torch.from_numpy(s.mask_future)[None])
    assert np.array_equal(row.metrics.confusion, ref.confusion.numpy())
    assert np.allclose(masked.metrics.iou, 100) and np.allclose(masked.metrics.miou, 100)
    # Only the camera-visible voxels were counted (the prediction is wrong everywhere else).
    n_visible = sum(int(ds[i].mask_future.sum()) for i in range(len(ds)))
    assert masked.metrics.confusion.sum() == n_visible < 2 * 6 * G.num_voxels


def test_noise_is_deterministic_and_row_independent(moving):
    ds = OccSequenceDataset(moving, "val", mask=None)
    a = run_eval(ds, [Noisy("a")], grid=G, seed=7, progress=False)[0]
    b, c = run_eval(ds, [Perfect(), Noisy("c")], grid=G, seed=7, progress=False)
    d = run_eval(ds, [Noisy("d")], grid=G, seed=8, progress=False)[0]
    assert np.array_equal(a.metrics.confusion, c.metrics.confusion)
    assert not np.array_equal(a.metrics.confusion, d.metrics.confusion)
    assert 40 < a.metrics.iou_mean_all < 90


def test_max_sequences_and_dump(moving, tmp_path):
    from occ_mfd.viz.forecast_io import load_forecast

    ds = OccSequenceDataset(moving, "val", mask=None)
    (row,) = run_eval(ds, [Perfect()], grid=G, max_sequences=1, dump_dir=tmp_path, dump_count=5, progress=False)
    assert row.metrics.confusion.sum() == 6 * G.num_voxels    # one sequence × 6 frames
    files = sorted((tmp_path / "perfect@1").glob("*.npz"))
    assert len(files) == 1
    rec = load_forecast(files[0])
    assert np.array_equal(rec.pred, ds[0].future) and np.array_equal(rec.past, ds[0].past)


def test_json_csv_shape_and_header(moving, tmp_path):
    ds = OccSequenceDataset(moving, "val", mask=None)
    rows = run_eval(ds, [Perfect(), CopyLast()], grid=G, progress=False)
    proto = protocol_header(data_root=moving, split="val", num_sequences=len(ds), grid=G, past=4, future=6,
                            mask=None, seed=0, device="cpu", batch_size=1,
                            models=[{"name": "perfect", "checkpoint": "x.pt", "steps": 1, "shift": 3.0,
                                     "cfg_scale": 2.0, "sampler": "euler"}])
    res = results_dict(proto, rows)
    write_json(tmp_path / "r.json", res)
    d = json.loads((tmp_path / "r.json").read_text())
    assert set(d) == {"protocol", "rows"}
    r0, r1 = d["rows"]
    for key in ("name", "steps", "nfe", "iou", "miou", "iou_mean_123", "miou_mean_123", "iou_mean_all",
                "miou_mean_all", "per_class_iou"):
        assert key in r0
    assert list(r0["iou"]) == ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0"]
    assert r0["iou"]["2.0"] == 100 and r0["per_class_iou"]["car"] == 100
    assert r0["per_class_iou"]["bus"] == 100 and r0["per_class_iou"]["vegetation"] is None   # NaN → null
    m = rows[1].metrics
    assert math.isclose(r1["miou_mean_123"], np.mean(m.miou[[1, 3, 5]]))
    assert math.isclose(r1["iou_mean_all"], np.mean(m.iou))
    p = d["protocol"]
    for key in ("data_root", "split", "num_sequences", "grid", "history_frames", "future_frames", "classes",
                "free_handling", "absent_class_rule", "mask", "models", "seed", "torch", "device"):
        assert key in p
    assert p["classes"][0] == "others" and len(p["classes"]) == 17 and p["num_sequences"] == 2
    head = format_header(p)
    for s in ("split=val", "sequences=2", "others", "excluded (NaN", "mask      none", "shift α=3.0", "CFG=2.0",
              "steps=1", "seed      0", "torch"):
        assert s in head, s
    table = format_table(res)
    assert "OccWorld/DOME" in table and "OccFM" in table and "100.0" in table
    write_csv(tmp_path / "r.csv", res)
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("name,steps,nfe,iou@0.5") and lines[1].startswith("perfect,1,1,100.0000")
    assert ",," in lines[1]                       # absent classes are empty cells


def test_plot(moving, tmp_path):
    from occ_mfd.eval.report import plot_curves

    ds = OccSequenceDataset(moving, "val", mask=None)
    res = results_dict({}, run_eval(ds, [CopyLast()], grid=G, progress=False))
    out = plot_curves(tmp_path / "c.png", res)
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
