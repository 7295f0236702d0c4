"""Consistency distillation: the boundary, an exact one-interval gradient, the lazy target EMA (also across a
resume), and the occupancy stage end to end."""
from pathlib import Path

import torch
from mmengine.config import Config

from occ_mfd.engine.loop import train
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.objectives.cd import ConsistencyDistillation
from stage_fixtures import stage_config
from test_mfd import PointMassFlow

D = 3
A, B = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0])


def _cd(**kw):
    # data = a point mass at A (the batch is the data), teacher = its exact flow, student = a point mass at B
    return ConsistencyDistillation(PointMassFlow(A), PointMassFlow(B, trainable=True), lambda x1: (x1, None), **kw)


def test_boundary_and_one_step_sample():
    obj = _cd()
    x = torch.randn(5, D, dtype=torch.float64)
    assert torch.equal(obj.consistency(obj.student, x, torch.ones(5, dtype=torch.float64), None), x)
    torch.testing.assert_close(obj.generate(x, None), B.double().expand(5, D))   # f(z, 0) = the student's jump
    assert obj.kind == "cd" and obj.phase(7) == "student"


def test_one_interval_gradient_is_exact():
    """N = 1: tau_k = 0, tau_{k+1} = 1, so y = the teacher's exact Euler jump = A and f_theta(x_0, 0) = B:
    with the squared error, dL/dB = 2 (B - A) / D exactly."""
    obj = _cd(grid_steps=1, huber_c=0.0)
    out = obj(A.double().expand(64, D), "student")
    out.loss.backward()
    torch.testing.assert_close(obj.student.c.grad, 2 * (B - A).double() / D)
    torch.testing.assert_close(out.loss.detach(), (B - A).double().pow(2).mean())


def test_target_ema_is_applied_lazily_and_survives_a_resume():
    obj = _cd(grid_steps=4, target_decay=0.9)
    opt = torch.optim.SGD(obj.param_groups()["student"], lr=0.5)
    data = A.double().expand(16, D)
    for _ in range(2):
        opt.zero_grad()
        obj(data, "student").loss.backward()
        opt.step()
    # after 2 steps, the target has absorbed step 1 only (step 2's update waits for the next forward)
    before = obj.target.c.detach().clone()
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    obj(data, "student")
    torch.testing.assert_close(obj.target.c.detach(), 0.9 * before + 0.1 * obj.student.c.detach())
    fresh = _cd(grid_steps=4, target_decay=0.9)
    fresh.load_state_dict(state)                          # a resumed run does the same pending update
    fresh(data, "student")
    torch.testing.assert_close(fresh.target.c, obj.target.c)


def test_occ_cd_stage_trains_and_evaluates(stages, tmp_path):
    tmp, data = stages
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / "configs/tiny/cd.py"))
    obj = {**cfg.objective.to_dict(), "teacher_snapshot": str(tmp / "teacher")}
    train(stage_config(data, obj, dict(student=dict(lr=1e-3, grad_clip=1.0)), 3), tmp_path / "cd")
    pipe, info = load_forecaster(tmp_path / "cd")
    assert (info.kind, info.steps, info.cfg_scale) == ("cd", 1, 1.0)
    teacher = load_snapshot(tmp / "teacher").weights["net"]
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.net.state_dict().items())   # it trained
