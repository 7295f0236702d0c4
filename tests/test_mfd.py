"""MeanFlowDistillation: schedule, frozen teacher, closed-form point-mass case (sign!), VSD, NFE, grad meter."""
import math

import pytest
import torch
from torch import nn

from occ_mfd.objectives.grad_stats import GradientVarianceMeter
from occ_mfd.objectives.mfd import MeanFlowDistillation, variational_score_distillation

torch.set_num_threads(1)
D = 3


class PointMassFlow(nn.Module):
    """Exact FM velocity of a point mass at ``c``: v(x, t) = (c - x) / (1 - t). Euler on it is exact."""

    def __init__(self, c, trainable=False):
        super().__init__()
        c = torch.as_tensor(c, dtype=torch.float64)
        self.c = nn.Parameter(c.clone()) if trainable else nn.Parameter(c.clone(), requires_grad=False)
        self.calls = []

    def forward(self, x, t, cond=None, drop_cond=None):
        self.calls.append((x.shape[0], None if drop_cond is None else drop_cond.clone()))
        return (self.c - x) / (1 - t[:, None])


def make(a, b, **kw):
    teacher, student, aux = PointMassFlow(a), PointMassFlow(b, trainable=True), PointMassFlow(b)
    # student(x0, t=0) = b - x0, so G(x0) = b: the student's distribution is a point mass at b
    return MeanFlowDistillation(teacher, student, aux, lambda batch: (batch, None), **kw)


def test_phase_schedule_aux_first():
    obj = make([0.0] * D, [1.0] * D, aux_steps=9, student_steps=1)
    phases = [obj.phase(i) for i in range(20)]
    assert phases == ["aux"] * 9 + ["student"] + ["aux"] * 9 + ["student"]
    obj2 = make([0.0] * D, [1.0] * D, aux_steps=2, student_steps=2)
    assert [obj2.phase(i) for i in range(8)] == ["aux", "aux", "student", "student"] * 2


def test_teacher_frozen_and_groups():
    obj = make([0.0] * D, [1.0] * D)
    obj.train()
    assert not obj.teacher.training and obj.student.training
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    groups = obj.param_groups()
    assert groups["student"] == [obj.student.c] and groups["aux"] == []  # aux.c frozen in this toy
    assert obj.ema_modules()["student"] is obj.student
    with pytest.raises(ValueError):
        MeanFlowDistillation(obj.teacher, obj.teacher, obj.aux, lambda b: (b, None))


def test_student_gradient_closed_form_and_sign():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0])
    obj = make(a, b, max_substep=0.01)
    B = 64
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    s = torch.rand(B, generator=g, dtype=torch.float64) * 0.5
    t = s + torch.rand(B, generator=g, dtype=torch.float64) * 0.4
    x1 = obj.generate(x0, None)
    assert torch.allclose(x1, b.double().expand(B, D))
    loss, logs = obj.student_loss(x1, x0, s, t, None)
    loss.backward()
    # U_T = (a - x_s)/(1-s), U_A = (b - x_s)/(1-s) exactly; x_s = (1-s) x0 + s b
    # ⇒ dL/db = (b - a) * mean_i[s_i / (1 - s_i)] / D   (mean over B·D elements)
    coef = (s / (1 - s)).mean() / D
    assert torch.allclose(obj.student.c.grad, (b - a).double() * coef, atol=1e-9)
    assert logs["nfe_teacher"] == math.ceil(float((t - s).max()) / 0.01) == logs["nfe_aux"]
    assert math.isclose(float(logs["mf_dist"]), float(((b - a).norm() / (1 - s)).mean()), rel_tol=1e-6)


@pytest.mark.parametrize("ratio", [1.0, 0.0])
def test_one_sgd_step_moves_student_toward_teacher(ratio):
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0])
    obj = make(a, b, max_substep=0.02, s_neq_t_ratio=ratio)
    torch.manual_seed(0)
    out = obj(torch.zeros(128, D, dtype=torch.float64), "student")
    out.loss.backward()
    new = obj.student.c.detach() - 0.01 * obj.student.c.grad  # plain SGD; small lr: 1/(1-s) is large near 1
    assert (new - a.double()).norm() < (b - a).double().norm()
    # the step is along a - b (the gradient is a positive multiple of b - a)
    cos = torch.dot(new - b.double(), (a - b).double()) / ((new - b.double()).norm() * (a - b).double().norm())
    assert cos > 1 - 1e-9


def test_vsd_factory_is_s_equals_t():
    vsd = variational_score_distillation(PointMassFlow([0.0] * D), PointMassFlow([1.0] * D, True),
                                         PointMassFlow([1.0] * D), lambda b: (b, None))
    assert vsd.s_neq_t_ratio == 0.0
    s, t = vsd.sample_interval(1000, "cpu", torch.float64)
    assert torch.equal(s, t)
    # t = max of two uniforms: density 2t, mean 2/3
    assert abs(float(t.mean()) - 2 / 3) < 0.03
    mfd = make([0.0] * D, [1.0] * D, s_neq_t_ratio=0.75)
    s, t = mfd.sample_interval(20000, "cpu", torch.float64)
    assert (s <= t).all() and abs(float((s < t).double().mean()) - 0.75) < 0.02
    with pytest.raises(ValueError):
        variational_score_distillation(vsd.teacher, vsd.student, vsd.aux, lambda b: (b, None),
                                       s_neq_t_ratio=0.5)


def test_cfg_teacher_one_batch_and_nfe():
    obj = make([0.0] * D, [1.0] * D, cfg_scale=2.0, max_substep=0.1)
    x = torch.zeros(8, D, dtype=torch.float64)
    s = torch.full((8,), 0.2, dtype=torch.float64)
    t = s + torch.linspace(0.0, 0.5, 8, dtype=torch.float64)
    _, logs = obj.student_loss(obj.generate(x, None), x, s, t, None)
    n = 5
    assert logs["nfe_teacher"] == 2 * n and logs["nfe_aux"] == n
    assert len(obj.teacher.calls) == n and all(c[0] == 16 for c in obj.teacher.calls)
    assert obj.teacher.calls[0][1].tolist() == [False] * 8 + [True] * 8


def test_aux_phase_trains_aux_only_on_student_samples():
    teacher, student = PointMassFlow([0.0] * D), PointMassFlow([1.0] * D, True)
    aux = PointMassFlow([3.0] * D, True)  # wrong location: FM on the student's samples pulls it to b = 1
    obj = MeanFlowDistillation(teacher, student, aux, lambda batch: (batch, None))
    torch.manual_seed(0)
    out = obj(torch.zeros(256, D, dtype=torch.float64), "aux")
    out.loss.backward()
    assert student.c.grad is None
    # L = mean((c - b)^2/(1-t)^2) over elements ⇒ dL/dc = 2 (c - b) E[1/(1-t)^2] / D > 0 along c - b
    assert (aux.c.grad > 0).all()


def test_gradient_variance_meter_matches_hand_ema():
    p = nn.Parameter(torch.zeros(2))
    meter = GradientVarianceMeter(beta=0.5)
    gs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])]
    for g in gs:
        p.grad = g.clone()
        stats = meter.update([p])
    # bias-corrected EMAs after 2 steps with beta 0.5: weights (0.25, 0.5)/0.75 = (1/3, 2/3)
    m1 = gs[0] / 3 + 2 * gs[1] / 3
    m2 = gs[0] ** 2 / 3 + 2 * gs[1] ** 2 / 3
    assert math.isclose(stats["grad_var"], float((m2 - m1 ** 2).sum()), rel_tol=1e-6)
    assert math.isclose(stats["grad_norm"], float(gs[1].norm()), rel_tol=1e-6)
