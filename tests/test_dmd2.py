"""DMD2's generator loss: exact gradient on point masses, direction on a linear student vs a Gaussian teacher,
and the occupancy stage end to end (snapshot kind, evaluation)."""
from pathlib import Path

import pytest
import torch
from mmengine.config import Config

from occ_mfd.builder import build
from occ_mfd.engine.checkpoint import load_config_from_checkpoint
from occ_mfd.engine.loop import train
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.objectives.dmd2 import DistributionMatchingDistillation
from stage_fixtures import stage_config
from test_mfd import A0, B0, MU, SIG, GaussianFlow, LinearStudent, PointMassFlow, StudentFlow, _mc_grad

D = 3


def test_point_mass_gradient_is_exact():
    """Teacher at a, student and fake at b: data predictions are exactly a and b at every t, w = mean|b - a|,
    so dL/db = (b - a) / (w · D) whatever t and the noise are."""
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0])
    obj = DistributionMatchingDistillation(PointMassFlow(a), PointMassFlow(b, trainable=True), PointMassFlow(b),
                                           lambda batch: (batch, None))
    torch.manual_seed(0)
    out = obj(torch.zeros(64, D, dtype=torch.float64), "student")
    out.loss.backward()
    w = (b - a).abs().mean().double()
    torch.testing.assert_close(obj.student.c.grad, (b - a).double() / (w * D), rtol=1e-6, atol=1e-9)
    assert obj.kind == "dmd2" and out.logs["nfe_teacher"] == 1.0
    assert [obj.phase(i) for i in range(5)] == ["aux"] * 4 + ["student"]


def test_descent_moves_a_linear_student_toward_the_gaussian_teacher():
    student = LinearStudent(A0, B0)
    obj = DistributionMatchingDistillation(GaussianFlow(MU, SIG ** 2), student, StudentFlow(student),
                                           lambda batch: (batch, None))
    g_a, g_b = _mc_grad(obj, n=200_000)
    assert -g_a > 0.05 and -g_b > 0.05, (g_a, g_b)      # a < sigma, b < mu: both should grow


def test_bad_time_range_is_refused():
    with pytest.raises(ValueError, match="t_min"):
        DistributionMatchingDistillation(PointMassFlow([0.0]), PointMassFlow([1.0], True), PointMassFlow([1.0]),
                                         lambda b: (b, None), t_min=0.5, t_max=0.4)


def test_occ_dmd2_stage_trains_and_evaluates(stages, tmp_path):
    tmp, data = stages
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / "configs/tiny/dmd2.py"))
    obj = {**cfg.objective.to_dict(), "teacher_snapshot": str(tmp / "teacher")}
    opt = dict(aux=dict(lr=1e-3, grad_clip=1.0), student=dict(lr=1e-3, grad_clip=1.0))
    train(stage_config(data, obj, opt, 5), tmp_path / "dmd2")
    pipe, info = load_forecaster(tmp_path / "dmd2")
    assert (info.kind, info.steps, info.cfg_scale) == ("dmd2", 1, 1.0)
    # one generator update happened (step 4 of 5): the student's weights left the teacher's
    teacher = load_snapshot(tmp / "teacher").weights["net"]
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.net.state_dict().items())
    # the stored config rebuilds without the teacher's files (its description replaces the path)
    stored = build(load_config_from_checkpoint(tmp_path / "dmd2/latest.pt").objective)
    assert stored.kind == "dmd2" and stored.t_min == 0.02 and stored.aux_steps == 4
