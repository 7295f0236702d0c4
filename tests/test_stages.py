"""The three training stages through the real engine, on a tiny prepared dataset: VAE → teacher → MFD.

Checks what glues them: checkpoints are self-contained (earlier stages' files may be deleted), the
MFD student starts as exactly the teacher's one-step Euler jump, and the eval loader rebuilds both.
"""
import shutil

import pytest
import torch
from mmengine.config import Config

from occ_mfd.engine.checkpoint import load_config_from_checkpoint
from occ_mfd.engine.loop import train
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.data.records import collate_sequences
from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.grid import GridSpec
from stage_fixtures import make_prepared

GRID = GridSpec((-8.0, -8.0, -1.0), (8.0, 8.0, 2.2), 0.8)  # 20 × 20 × 4
TRAIN = dict(batch_size=1, num_workers=0, warmup_steps=0, ema_decay=0.9, amp=None, log_interval=1,
             ckpt_interval=100, keep_ckpts=1, seed=0, max_nonfinite=5, tensorboard=False)


def _cfg(data_root, objective, optim, steps):
    return Config(dict(
        data=dict(type="occ_mfd.data.sequences.OccSequenceDataset", root=str(data_root), split="train",
                  past=4, future=6, pool=1, mask=None),
        objective=objective, optim=optim, train=dict(TRAIN, max_steps=steps)))


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("stages")
    data = make_prepared(tmp / "occ", GRID)
    opt = dict(main=dict(lr=1e-3, weight_decay=0.0, grad_clip=1.0))
    vae = dict(type="occ_mfd.models.vae_objective.VAEObjective", max_frames=2,
               vae=dict(type="occ_mfd.models.vae.OccVAE", grid_z=4, channels=(8, 8, 8), latent_channels=4,
                        downsample=2, sparse=False))
    train(_cfg(data, vae, opt, 2), tmp / "vae", print_fn=lambda *a, **k: None)
    teacher = dict(type="occ_mfd.models.teacher.OccFlowTeacher", vae_ckpt=str(tmp / "vae/latest.pt"),
                   net=dict(past=4, future=6, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                            attn_levels=(), heads=1), cfg_scale=2.0)
    train(_cfg(data, teacher, opt, 2), tmp / "teacher", print_fn=lambda *a, **k: None)
    mfd = dict(type="occ_mfd.distill.occ_mfd.OccMeanFlowDistillation", teacher_ckpt=str(tmp / "teacher/latest.pt"),
               ode_step=0.25, aux_steps=1, student_steps=1)
    mopt = dict(aux=dict(lr=1e-3, grad_clip=1.0), student=dict(lr=1e-3, grad_clip=1.0))
    train(_cfg(data, mfd, mopt, 2), tmp / "mfd", print_fn=lambda *a, **k: None)
    return tmp, data


def _batch(data):
    ds = OccSequenceDataset(data, split="val", past=4, future=6)
    return collate_sequences([ds[0]])


def test_checkpoints_are_self_contained(stages):
    tmp, data = stages
    tcfg = load_config_from_checkpoint(tmp / "teacher/latest.pt").objective
    assert tcfg["vae_ckpt"] is None and tcfg["vae"]["latent_channels"] == 4
    mcfg = load_config_from_checkpoint(tmp / "mfd/latest.pt").objective
    assert mcfg["teacher_ckpt"] is None and mcfg["teacher"]["vae"]["grid_z"] == 4
    # Delete the earlier stages: the student checkpoint still loads and forecasts.
    shutil.copytree(tmp / "mfd", tmp / "mfd_copy")
    for d in ("vae", "teacher"):
        shutil.move(tmp / d, tmp / f"{d}_gone")
    try:
        pipe, info = load_forecaster(tmp / "mfd_copy/latest.pt")
        assert info.kind == "student" and info.steps == 1 and info.grid == GRID
        out = pipe.forecast(_batch(data), generator=torch.Generator().manual_seed(0))
        assert out.classes.shape == (1, 6, 20, 20, 4) and out.nfe == 1
    finally:
        for d in ("vae", "teacher"):
            shutil.move(tmp / f"{d}_gone", tmp / d)


def test_student_starts_as_teacher_one_step_jump(stages):
    """Before any update, student@1 == teacher@1 (uniform grid, no CFG) on the same noise, exactly."""
    tmp, data = stages
    from occ_mfd.distill.occ_mfd import OccMeanFlowDistillation

    obj = OccMeanFlowDistillation(teacher_ckpt=str(tmp / "teacher/latest.pt")).eval()
    teacher_pipe, _ = load_forecaster(tmp / "teacher/latest.pt")
    batch = _batch(data)
    a = obj.pipeline().forecast(batch, generator=torch.Generator().manual_seed(3))
    b = teacher_pipe.forecast(batch, steps=1, cfg_scale=1.0, generator=torch.Generator().manual_seed(3))
    # With the α-shifted grid, one step still spans [0, 1]: the same single Euler jump.
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-6)
    assert torch.equal(a.classes, b.classes)


def test_teacher_pipeline_uses_config_sampler(stages):
    tmp, _ = stages
    pipe, info = load_forecaster(tmp / "teacher/latest.pt")
    assert (info.kind, info.steps, info.shift, info.cfg_scale) == ("teacher", 10, 3.0, 2.0)
