"""OccMetrics against scikit-learn, hand-computed cases and a real Occ3D frame."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, jaccard_score

from occ_mfd.eval.metrics import OccMetrics, iou_from_confusion

C, FREE = 18, 17


def _rand(shape, seed, p_free=0.6):
    g = np.random.default_rng(seed)
    lab = g.integers(0, 16, size=shape)            # class 16 never appears in random data → absent
    lab[g.random(shape) < p_free] = FREE
    return lab


def test_matches_sklearn_on_random_data():
    B, F, X, Y, Z = 2, 3, 6, 5, 4
    gt, pred = _rand((B, F, X, Y, Z), 0), _rand((B, F, X, Y, Z), 1)
    mask = np.random.default_rng(2).random((B, F, X, Y, Z)) < 0.7
    m = OccMetrics(horizons=F)
    # two updates = one dataset-level accumulation
    m.update(torch.from_numpy(pred[:1]), torch.from_numpy(gt[:1]), torch.from_numpy(mask[:1]))
    m.update(torch.from_numpy(pred[1:]), torch.from_numpy(gt[1:]), torch.from_numpy(mask[1:]))
    r = m.compute()
    for f in range(F):
        g, p = gt[:, f][mask[:, f]], pred[:, f][mask[:, f]]
        np.testing.assert_array_equal(r.confusion[f], confusion_matrix(g, p, labels=list(range(C))))
        present = sorted(set(g) | set(p))
        sem = [c for c in present if c != FREE]
        ref = jaccard_score(g, p, labels=sem, average=None) * 100
        np.testing.assert_allclose(r.per_class_iou[f][sem], ref, rtol=1e-12)
        assert np.isnan(r.per_class_iou[f][16])               # absent from both → NaN, not 100
        assert r.miou[f] == pytest.approx(ref.mean())
        iou_ref = jaccard_score(g != FREE, p != FREE) * 100
        assert r.iou[f] == pytest.approx(iou_ref)


def test_hand_computed_tiny_case_and_absent_class():
    # one sample, one frame, 4 voxels: gt = [car, car, free, veg], pred = [car, free, car, veg]
    gt = torch.tensor([4, 4, 17, 16]).view(1, 1, 4, 1, 1)
    pred = torch.tensor([4, 17, 4, 16]).view(1, 1, 4, 1, 1)
    m = OccMetrics(horizons=1)
    m.update(pred, gt)
    r = m.compute()
    # occupied: TP = 2 (v0, v3), FN = 1 (v1), FP = 1 (v2) → 2/4
    assert r.iou[0] == pytest.approx(50.0)
    # car: TP 1, FP 1, FN 1 → 1/3; vegetation: 1/1; all other classes absent → NaN (excluded)
    assert r.per_class_iou[0, 4] == pytest.approx(100 / 3)
    assert r.per_class_iou[0, 16] == pytest.approx(100.0)
    assert np.isnan(r.per_class_iou[0, [0, 1, 2, 3, 5, 15]]).all()
    assert r.miou[0] == pytest.approx((100 / 3 + 100) / 2)   # OccWorld's "absent = 1" would give ~98


def test_mask_excludes_voxels():
    gt = torch.tensor([4, 4, 17, 16]).view(1, 1, 4, 1, 1)
    pred = torch.tensor([4, 17, 4, 16]).view(1, 1, 4, 1, 1)
    mask = torch.tensor([True, False, False, True]).view(1, 1, 4, 1, 1)   # hide both errors
    m = OccMetrics(horizons=1)
    m.update(pred, gt, mask)
    r = m.compute()
    assert r.iou[0] == 100.0 and r.miou[0] == 100.0
    assert r.confusion.sum() == 2


def test_perfect_prediction_and_summaries():
    gt = torch.from_numpy(_rand((1, 6, 5, 5, 3), 3))
    m = OccMetrics()
    m.update(gt.clone(), gt)
    r = m.compute()
    np.testing.assert_allclose(r.iou, 100.0)
    np.testing.assert_allclose(r.miou, 100.0)
    np.testing.assert_allclose(r.horizons_s, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    # summaries: distinct per-frame values make the index choice visible
    m2 = OccMetrics()
    conf = np.zeros((6, C, C), dtype=np.int64)
    for f in range(6):          # frame f: TP = f+1, FN = 1 → IoU = (f+1)/(f+2)
        conf[f, 4, 4], conf[f, 4, FREE] = f + 1, 1
    m2.confusion = torch.from_numpy(conf)
    r2 = m2.compute()
    ious = np.array([100 * (f + 1) / (f + 2) for f in range(6)])
    np.testing.assert_allclose(r2.iou, ious)
    assert r2.iou_mean_123 == pytest.approx(ious[[1, 3, 5]].mean())
    assert r2.iou_mean_all == pytest.approx(ious.mean())
    d = r2.to_dict()
    assert d["iou"]["1.0"] == pytest.approx(ious[1]) and d["per_class_iou"]["bus"] is None


def test_empty_frame_is_nan_and_bad_input_errors():
    iou, per, miou = iou_from_confusion(np.zeros((C, C)))
    assert math.isnan(iou) and math.isnan(miou) and np.isnan(per).all()
    m = OccMetrics(horizons=2)
    with pytest.raises(ValueError, match="labels"):
        m.update(torch.full((1, 2, 2, 2, 2), 18), torch.zeros(1, 2, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="future frames"):
        m.update(torch.zeros(1, 3, 2, 2, 2, dtype=torch.long), torch.zeros(1, 3, 2, 2, 2, dtype=torch.long))
    m.all_reduce()       # no process group: a no-op
    assert m.confusion.sum() == 0


def test_real_occ3d_frame(real_root):
    path = real_root / "CVPR2023-3D-Occupancy-Prediction/data/29796060110c4163b07f06eff4af0753/labels.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with np.load(path) as z:
        sem, cam = z["semantics"], z["mask_camera"].astype(bool)
    gt = torch.from_numpy(sem).long()[None, None]           # (1, 1, 200, 200, 16)
    m = OccMetrics(horizons=1)
    m.update(gt, gt, torch.from_numpy(cam)[None, None])
    r = m.compute()
    assert r.iou[0] == 100.0 and r.miou[0] == 100.0
    present = set(np.unique(sem[cam])) - {FREE}
    assert set(np.flatnonzero(~np.isnan(r.per_class_iou[0]))) == present
    m = OccMetrics(horizons=1)
    m.update(torch.full_like(gt, FREE), gt)
    r = m.compute()
    assert r.iou[0] == 0.0 and r.miou[0] == 0.0


def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gt = torch.from_numpy(_rand((1, 2, 4, 4, 2), 10 + rank))
    pred = torch.from_numpy(_rand((1, 2, 4, 4, 2), 20 + rank))
    m = OccMetrics(horizons=2)
    m.update(pred, gt)
    m.all_reduce()
    if rank == 0:
        torch.save(m.confusion, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_sums_over_processes(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "c.pt")), nprocs=2)
    ref = OccMetrics(horizons=2)
    for rank in range(2):
        ref.update(torch.from_numpy(_rand((1, 2, 4, 4, 2), 20 + rank)),
                   torch.from_numpy(_rand((1, 2, 4, 4, 2), 10 + rank)))
    assert torch.equal(torch.load(tmp_path / "c.pt"), ref.confusion)
