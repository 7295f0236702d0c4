"""The three training stages through the real engine, on a tiny prepared dataset: VAE → teacher → MFD.

Checks what glues them: each stage writes an inference snapshot with the EMA weights of exactly what
inference needs; checkpoints and snapshots are self-contained (earlier stages' files may be deleted); the
eval loader rebuilds forecasters from snapshots and refuses what is not one.
"""
import shutil

import pytest
import torch

from occ_mfd.data.records import collate_sequences
from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.engine.checkpoint import build_objective_from_checkpoint, load_checkpoint, load_config_from_checkpoint
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.objectives.mfd import OccMeanFlowDistillation
from occ_mfd.engine.loop import train
from occ_mfd.grid import GridSpec
from stage_fixtures import STAGE_GRID as GRID
from stage_fixtures import make_prepared, stage_config

def _batch(data):
    ds = OccSequenceDataset(data, split="val", past=4, future=6)
    return collate_sequences([ds[0]])


def _equal_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_and_snapshots_are_self_contained(stages):
    tmp, data = stages
    tcfg = load_config_from_checkpoint(tmp / "teacher/latest.pt").objective
    assert tcfg["vae_snapshot"] is None and tcfg["vae"]["networks"]["vae"]["kwargs"]["latent_channels"] == 4
    mcfg = load_config_from_checkpoint(tmp / "mfd/latest.pt").objective
    assert mcfg["teacher_snapshot"] is None and mcfg["teacher"]["networks"]["vae"]["kwargs"]["grid_z"] == 4
    # Delete the earlier stages: the student snapshot still forecasts and the full checkpoint still rebuilds.
    shutil.copytree(tmp / "mfd", tmp / "mfd_copy")
    for d in ("vae", "teacher"):
        shutil.move(tmp / d, tmp / f"{d}_gone")
    try:
        pipe, info = load_forecaster(tmp / "mfd_copy")
        assert info.kind == "student" and info.steps == 1 and info.grid == GRID and info.step == 2
        out = pipe.forecast(_batch(data), generator=torch.Generator().manual_seed(0))
        assert out.classes.shape == (1, 6, 20, 20, 4) and out.nfe == 1
        obj = build_objective_from_checkpoint(tmp / "mfd_copy/latest.pt")
        assert _equal_state(obj.student.state_dict(), pipe.net.state_dict())       # EMA student in both
    finally:
        for d in ("vae", "teacher"):
            shutil.move(tmp / f"{d}_gone", tmp / d)


def test_snapshots_hold_the_ema_weights_of_one_network(stages):
    """The student snapshot = VAE + the EMA student; the teacher's VAE is the VAE stage's EMA VAE."""
    tmp, _ = stages
    vae_ckpt, mfd_ckpt = load_checkpoint(tmp / "vae/latest.pt"), load_checkpoint(tmp / "mfd/latest.pt")
    vae_snap, teacher_snap, student_snap = (load_snapshot(tmp / d) for d in ("vae", "teacher", "mfd"))
    assert (vae_snap.kind, teacher_snap.kind, student_snap.kind) == ("vae", "teacher", "student")
    assert sorted(student_snap.weights) == ["net", "vae"]                 # no teacher, aux or optimiser state
    assert _equal_state(vae_snap.weights["vae"], vae_ckpt["ema"]["shadow"]["vae"])
    assert _equal_state(teacher_snap.weights["vae"], vae_snap.weights["vae"])
    assert _equal_state(student_snap.weights["vae"], vae_snap.weights["vae"])
    assert _equal_state(student_snap.weights["net"], mfd_ckpt["ema"]["shadow"]["student"])
    # the student took an update: its EMA weights differ from the teacher's (the copy it started from)
    assert not _equal_state(student_snap.weights["net"], teacher_snap.weights["net"])
    pipe, _ = load_forecaster(tmp / "mfd/snapshot.pt")
    n_net = sum(v.numel() for v in student_snap.weights["net"].values() if v.is_floating_point())
    n_vae = sum(v.numel() for v in student_snap.weights["vae"].values() if v.is_floating_point())
    assert sum(p.numel() for p in pipe.parameters()) <= n_net + n_vae


def test_teacher_snapshot_uses_config_sampler_and_vsd_is_named_once(stages):
    tmp, _ = stages
    _, info = load_forecaster(tmp / "teacher")
    assert (info.kind, info.steps, info.shift, info.cfg_scale) == ("teacher", 10, 3.0, 2.0)
    vsd = OccMeanFlowDistillation(teacher_snapshot=str(tmp / "teacher"), s_neq_t_ratio=0.0)
    assert vsd.kind == "vsd" and vsd.inference_parts().kind == "vsd"
    assert vsd.inference_parts().sampler.steps == 1 and vsd.cfg_scale == 2.0   # guidance of the teacher


def test_loader_refuses_what_is_not_a_forecaster_snapshot(stages):
    tmp, _ = stages
    with pytest.raises(ValueError, match="training checkpoint.*snapshot.pt"):
        load_forecaster(tmp / "mfd/latest.pt")
    with pytest.raises(ValueError, match="not a forecaster"):
        load_forecaster(tmp / "vae")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_forecaster(tmp / "nowhere/snapshot.pt")
    with pytest.raises(ValueError, match="kind 'vae', expected teacher"):
        OccMeanFlowDistillation(teacher_snapshot=str(tmp / "vae"))


def test_a_stage_refuses_data_on_another_grid_than_its_source(stages, tmp_path):
    tmp, _ = stages
    other = make_prepared(tmp_path / "occ", GridSpec((-8.0, -8.0, -1.0), (8.0, 8.0, 2.2), 0.4))   # 40 × 40 × 8
    mfd = dict(type="occ_mfd.objectives.mfd.OccMeanFlowDistillation", teacher_snapshot=str(tmp / "teacher"))
    opt = dict(aux=dict(lr=1e-3), student=dict(lr=1e-3))
    with pytest.raises(ValueError, match=r"teacher snapshot .*teacher/snapshot.pt vs data .*occ: grid mismatch"):
        train(stage_config(other, mfd, opt, 1), tmp_path / "mfd")
    assert not (tmp_path / "mfd" / "latest.pt").exists()


def test_a_finished_stage_rewrites_a_missing_snapshot(stages, tmp_path):
    tmp, data = stages
    shutil.copytree(tmp / "teacher", tmp_path / "teacher")
    original = load_snapshot(tmp_path / "teacher")
    (tmp_path / "teacher" / "snapshot.pt").unlink()
    cfg = load_config_from_checkpoint(tmp_path / "teacher" / "latest.pt")
    assert train(cfg, tmp_path / "teacher").finished
    again = load_snapshot(tmp_path / "teacher")
    assert again.kind == "teacher" and again.step == original.step and again.grid == original.grid
    for name in ("vae", "net"):
        assert _equal_state(again.weights[name], original.weights[name]), name
