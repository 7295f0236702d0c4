"""SenseFlow: the IDA lerp (exact, lazy, never in after_backward, across a resume), ISG's closed form on a hand-computed
case, the sign of one update on the Gaussian toy, and the occupancy stage end to end."""
import math
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch import nn

from occ_mfd.engine.checkpoint import load_checkpoint
from occ_mfd.engine.loop import train
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.objectives.senseflow import SenseFlowDistillation
from stage_fixtures import stage_config
from test_mfd import A0, B0, MU, SIG, GaussianFlow, LinearStudent, PointMassFlow, StudentFlow, gauss_velocity

D = 3
A, B, C = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0]), torch.tensor([4.0, 4.0, -4.0])


def _point_masses(**kw):
    # teacher at A, student at B (trainable), aux at C (trainable: IDA mixes the student into it)
    return SenseFlowDistillation(PointMassFlow(A), PointMassFlow(B, trainable=True), PointMassFlow(C, trainable=True),
                                 lambda x: (x, None), **kw)


def test_ida_lerp_is_exact_lazy_and_survives_a_resume():
    obj = _point_masses(ida_decay=0.97)
    opt = torch.optim.SGD([obj.student.c], lr=0.1)
    x = torch.zeros(16, D, dtype=torch.float64)
    assert obj.kind == "senseflow" and [obj.phase(i) for i in range(5)] == ["aux"] * 4 + ["student"]
    torch.manual_seed(0)
    obj(x, "student").loss.backward()
    grad = obj.student.c.grad.clone()
    obj.after_backward("student")
    assert torch.equal(obj.student.c.grad, grad) and torch.equal(obj.aux.c.detach(), C.double())   # no IDA yet
    opt.step()
    student = obj.student.c.detach().clone()
    assert not torch.equal(student, B.double())
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    obj(x, "aux")                                       # the next forward applies the pending IDA, once
    expected = 0.97 * C.double() + 0.03 * student       # hand: aux ← λ aux + (1 − λ) student
    torch.testing.assert_close(obj.aux.c.detach(), expected, rtol=0, atol=1e-15)
    obj(x, "aux")
    torch.testing.assert_close(obj.aux.c.detach(), expected, rtol=0, atol=1e-15)   # not applied twice
    fresh = _point_masses(ida_decay=0.97)
    fresh.load_state_dict(state)                        # a resumed run does the same pending update
    assert bool(fresh._ida_pending)
    fresh(x, "aux")
    torch.testing.assert_close(fresh.aux.c.detach(), expected, rtol=0, atol=1e-15)


def test_ida_needs_matching_parameter_names():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(D, dtype=torch.float64))

    with pytest.raises(ValueError, match="by name"):
        SenseFlowDistillation(PointMassFlow(A), PointMassFlow(B, trainable=True), Other(), lambda x: (x, None))
    SenseFlowDistillation(PointMassFlow(A), PointMassFlow(B, trainable=True), Other(), lambda x: (x, None),
                          ida_decay=1.0)                # IDA off: no matching needed


class ConstantFlow(nn.Module):
    """v(x, t) = m everywhere."""

    def __init__(self, m):
        super().__init__()
        self.m = torch.as_tensor(m, dtype=torch.float64)

    def forward(self, x, t, cond=None, drop_cond=None):
        return self.m.expand_as(x)


class TimeLinear(nn.Module):
    """net(x, t) = p + q·t (independent of x): G(z) = z + p, and its field at t_mid is p + q·t_mid."""

    def __init__(self, p, q):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=torch.float64))
        self.q = nn.Parameter(torch.tensor(q, dtype=torch.float64))

    def forward(self, x, t, cond=None, drop_cond=None):
        return (self.p + self.q * t[:, None]).expand_as(x)


def test_isg_closed_form_on_a_hand_computed_case():
    """Teacher v = m; student net = p + q t. x_mid = z + t m; y = x_mid + (1 − t)(p + q t); G(z) = z + p, so
    G(z) − y = t (p − m) − t (1 − t) q, independent of z. m = (0, 0.5), p = (0.002, −0.5), q = (0, 2):
    t = 0.25 → (0.0005, −0.625); t = 0.5 → (0.001, −1.0)."""
    obj = SenseFlowDistillation(ConstantFlow([0.0, 0.5]), TimeLinear([0.002, -0.5], [0.0, 2.0]),
                                TimeLinear([0.0, 0.0], [0.0, 0.0]), lambda x: (x, None))
    z = torch.randn(2, 2, dtype=torch.float64)
    t_mid = torch.tensor([0.25, 0.5], dtype=torch.float64)
    loss, _ = obj.intra_segment_guidance(z, obj.generate(z, None), None, t_mid=t_mid)
    loss.backward()
    diffs = [[0.0005, -0.625], [0.001, -1.0]]
    c = 1e-3
    h = [[math.sqrt(d * d + c * c) - c for d in row] for row in diffs]    # 1.1803e-4, 0.6240008, 4.1421e-4, 0.9990005
    assert math.isclose(float(loss.detach()), sum(map(sum, h)) / 4, rel_tol=1e-12)
    assert math.isclose(float(loss.detach()), (1.18033989e-4 + 0.6240008 + 4.14213562e-4 + 0.9990005) / 4, rel_tol=1e-6)
    # gradient only through G(z) = z + p (the target y is without grad): dL/dp_d = mean_b h'(diff_bd) / 2
    dh = [[d / math.sqrt(d * d + c * c) for d in row] for row in diffs]
    expected = torch.tensor([(dh[0][0] + dh[1][0]) / 4, (dh[0][1] + dh[1][1]) / 4], dtype=torch.float64)
    torch.testing.assert_close(obj.student.p.grad, expected, rtol=1e-10, atol=0)
    assert obj.student.q.grad is None or float(obj.student.q.grad.abs().sum()) == 0.0


def test_one_step_moves_a_linear_student_toward_the_gaussian_teacher():
    """DM + ISG on G(z) = a z + b against N(mu, sigma^2), with the exact aux (the student's own flow; it has no
    parameters, so IDA is off): one SGD step moves (a, b) toward (sigma, mu)."""
    student = LinearStudent(A0, B0)
    obj = SenseFlowDistillation(GaussianFlow(MU, SIG ** 2), student, StudentFlow(student), lambda x: (x, None),
                                ida_decay=1.0)
    torch.manual_seed(0)
    out = obj(torch.zeros(100_000, 1, dtype=torch.float64), "student")
    out.loss.backward()
    assert out.logs["nfe_teacher"] == 2.0 and out.logs["nfe_student"] == 2.0 and float(out.logs["isg_loss"]) > 0
    with torch.no_grad():
        a, b = student.a - 0.1 * student.a.grad, student.b - 0.1 * student.b.grad
    assert abs(float(a) - SIG) < abs(A0 - SIG) - 0.01 and abs(float(b) - MU) < abs(B0 - MU) - 0.01, (a, b)
    # ISG alone pulls b toward mu too: E[G(z) − y] = t (b − mu (1 + (1 − t)(a − 1))) < 0 at a = 0.5, b = 0
    student.zero_grad()
    z = torch.randn(20_000, 1, dtype=torch.float64)
    obj.intra_segment_guidance(z, obj.generate(z, None), None)[0].backward()
    assert float(student.b.grad) < -0.1


def test_occ_senseflow_stage_trains_and_evaluates(stages, tmp_path):
    tmp, data = stages
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / "configs/tiny/senseflow.py"))
    obj = {**cfg.objective.to_dict(), "teacher_snapshot": str(tmp / "teacher")}
    opt = dict(aux=dict(lr=1e-3, grad_clip=1.0), student=dict(lr=1e-3, grad_clip=1.0))
    train(stage_config(data, obj, opt, 5), tmp_path / "sf")
    pipe, info = load_forecaster(tmp_path / "sf")
    assert (info.kind, info.steps, info.cfg_scale) == ("senseflow", 1, 1.0)
    teacher = load_snapshot(tmp / "teacher").weights["net"]
    assert any(not torch.equal(v, teacher[k]) for k, v in pipe.net.state_dict().items())   # it trained
    # step 4 was the student update: its IDA is pending in the checkpoint, to be applied by the next forward
    assert bool(load_checkpoint(tmp_path / "sf/latest.pt")["objective"]["_ida_pending"])


class ExactAtZero(nn.Module):
    """A one-step student that is exact at t = 0 for N(0, sigma^2) (net(z, 0) = (a − 1) z, exact at a = sigma) and
    still the teacher at t > 0 (it is a teacher copy trained only at its t = 0 anchor)."""

    def __init__(self, a, var):
        super().__init__()
        self.a, self.var = nn.Parameter(torch.tensor(float(a), dtype=torch.float64)), var

    def forward(self, x, t, cond=None, drop_cond=None):
        return torch.where(t[:, None] == 0, (self.a - 1) * x, gauss_velocity(x, t, 0.0, self.var))


def test_one_step_isg_pulls_the_exact_student_away_from_the_solution():
    """Genuine property of ISG with one segment [0, 1] (not a bug): its target y is the teacher's Euler step to
    t_mid finished by the student's field at t_mid, i.e. a two-step Euler sample while that field is still the
    teacher's. Data N(0, σ²), σ = 0.5, exact student G(z) = σ z: at t_mid = τ,
    y = (1 − τ) z [1 + (1 − τ)(τσ² − (1 − τ)) / ((1 − τ)² + τ²σ²)] = 0.2 z at τ = 0.5 (hand-computed), and → 0 (the
    teacher's one-step jump E[x1]) as τ → 1. The DM gradient is 0 there (exact aux), so ISG alone moves a away from
    σ, toward 0.2: the toy study's SenseFlow plateau (README, distiller study)."""
    sig = 0.5
    student = ExactAtZero(sig, sig ** 2)
    obj = SenseFlowDistillation(GaussianFlow(0.0, sig ** 2), student, GaussianFlow(0.0, sig ** 2),
                                lambda x: (x, None), ida_decay=1.0)
    z = torch.randn(4096, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tau = 0.5
    with torch.no_grad():
        x_mid = z + tau * obj.teacher(z, torch.zeros(len(z), dtype=torch.float64))
        y = x_mid + (1 - tau) * student(x_mid, torch.full((len(z),), tau, dtype=torch.float64))
    torch.testing.assert_close(y, 0.2 * z, rtol=1e-12, atol=1e-12)
    dm, _ = obj.distribution_matching_loss(obj.generate(z, None), torch.randn_like(z),
                                           torch.full((len(z),), 0.3, dtype=torch.float64), None)
    dm.backward()
    assert abs(float(student.a.grad)) < 1e-12                              # DM: nothing to fix
    student.zero_grad()
    loss, _ = obj.intra_segment_guidance(z, obj.generate(z, None), None, t_mid=torch.full((len(z),), tau,
                                                                                          dtype=torch.float64))
    loss.backward()
    # L = mean(√((0.3 z)² + c²) − c) ⇒ dL/da = mean(z · 0.3 z / √((0.3 z)² + c²)) ≈ E|z| = √(2/π) ≈ 0.798
    assert float(student.a.grad) > 0.75                                   # descent lowers a below σ
