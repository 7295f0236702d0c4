"""MeanFlowDistillation: schedule, frozen teacher, closed-form point-mass case (sign!), a non-degenerate linear
student against a Gaussian teacher in closed form (fresh vs coupled noise), VSD = Diff-Instruct, NFE, grad meter."""
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


def test_vsd_factory_is_s_equals_t_with_uniform_time():
    vsd = variational_score_distillation(PointMassFlow([0.0] * D), PointMassFlow([1.0] * D, True),
                                         PointMassFlow([1.0] * D), lambda b: (b, None))
    assert vsd.s_neq_t_ratio == 0.0 and vsd.kind == "vsd" and vsd.noise == "fresh"
    torch.manual_seed(0)
    s, t = vsd.sample_interval(20000, "cpu", torch.float64)
    assert torch.equal(s, t)
    # Diff-Instruct: t ~ U(0, 1), mean 1/2, variance 1/12
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.var()) - 1 / 12) < 0.003
    old = variational_score_distillation(vsd.teacher, vsd.student, vsd.aux, lambda b: (b, None), vsd_time="max2")
    s, t = old.sample_interval(20000, "cpu", torch.float64)
    assert torch.equal(s, t) and abs(float(t.mean()) - 2 / 3) < 0.01   # max of two uniforms: density 2t
    mfd = make([0.0] * D, [1.0] * D, s_neq_t_ratio=0.75)
    s, t = mfd.sample_interval(20000, "cpu", torch.float64)
    assert (s <= t).all() and abs(float((s < t).double().mean()) - 0.75) < 0.02
    with pytest.raises(ValueError):
        variational_score_distillation(vsd.teacher, vsd.student, vsd.aux, lambda b: (b, None),
                                       s_neq_t_ratio=0.5)
    with pytest.raises(ValueError, match="noise"):
        make([0.0] * D, [1.0] * D, noise="shared")


# ------------------------------------------------------------------ a non-degenerate student, in closed form
# Teacher: the exact flow of N(mu, sig^2). Student: G(z) = a z + b, i.e. N(b, a^2). Aux: the exact flow of the
# student's own distribution. For Gaussian data N(m, v) on x_t = (1-t) n + t x1 the velocity is linear:
#     E[x1 - n | x_t = x] = m + beta(t) (x - t m),   beta(t) = (t v - (1 - t)) / ((1 - t)^2 + t^2 v).

def gauss_velocity(x, t, m, v):
    tt = t[:, None]
    beta = (tt * v - (1 - tt)) / ((1 - tt) ** 2 + tt ** 2 * v)
    return m + beta * (x - tt * m)


class GaussianFlow(nn.Module):
    def __init__(self, mu, var):
        super().__init__()
        self.mu, self.var = mu, var

    def forward(self, x, t, cond=None, drop_cond=None):
        return gauss_velocity(x, t, self.mu, self.var)


class LinearStudent(nn.Module):
    """student(x, t) = (a - 1) x + b, so G(z) = z + student(z, 0) = a z + b."""

    def __init__(self, a, b):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a), dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(float(b), dtype=torch.float64))

    def forward(self, x, t, cond=None, drop_cond=None):
        return (self.a - 1) * x + self.b


class StudentFlow(nn.Module):
    """The exact flow of the student's current distribution N(b, a^2) (a perfectly trained aux)."""

    def __init__(self, student):
        super().__init__()
        self.__dict__["student"] = student          # a reference, not a submodule

    def forward(self, x, t, cond=None, drop_cond=None):
        a, b = self.student.a.detach(), self.student.b.detach()
        return gauss_velocity(x, t, b, a * a)


MU, SIG, A0, B0 = 1.0, 2.0, 0.5, 0.0


def _vsd_expected_grad(noise: str) -> tuple[float, float]:
    """E over t ~ U(0,1), z, n of d/d(a, b) mean((v_A - v_T)(x_t, t) x_t), by quadrature over t.

    diff(x) = c0 + c1 x; x_t = (1-t) n + t (a z + b). Fresh n: E[x_t z] = t a. Coupled n = z: E[x_t z] = 1 - t + t a.
    """
    t = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    bt = lambda v: (t * v - (1 - t)) / ((1 - t) ** 2 + t ** 2 * v)  # noqa: E731
    c1 = bt(A0 * A0) - bt(SIG ** 2)
    c0 = (B0 - bt(A0 * A0) * t * B0) - (MU - bt(SIG ** 2) * t * MU)
    cov_xz = t * A0 if noise == "fresh" else 1 - t + t * A0
    g_a = (c1 * t * cov_xz).mean()
    g_b = (t * (c0 + c1 * t * B0)).mean()
    return float(g_a), float(g_b)


def _mc_grad(obj, n=400_000, seed=0):
    torch.manual_seed(seed)
    obj.student.zero_grad()
    obj(torch.zeros(n, 1, dtype=torch.float64), "student").loss.backward()
    return float(obj.student.a.grad), float(obj.student.b.grad)


@pytest.mark.parametrize("noise", ["fresh", "coupled"])
def test_vsd_gradient_of_a_linear_student_matches_closed_form(noise):
    student = LinearStudent(A0, B0)
    obj = variational_score_distillation(GaussianFlow(MU, SIG ** 2), student, StudentFlow(student),
                                         lambda batch: (batch, None), noise=noise)
    g_a, g_b = _mc_grad(obj)
    e_a, e_b = _vsd_expected_grad(noise)
    o_a, _ = _vsd_expected_grad("coupled" if noise == "fresh" else "fresh")
    tol = 0.01                                                   # ≈ 5 Monte-Carlo standard errors at n = 4e5
    assert abs(g_a - e_a) < tol and abs(g_b - e_b) < tol, (g_a, e_a, g_b, e_b)
    assert abs(e_a - o_a) > 10 * tol                             # the two noises are told apart
    if noise == "fresh":
        # descent moves (a, b) toward the teacher's (sigma, mu): a < sigma and b < mu here
        assert -g_a > 0 and -g_b > 0


def test_mfd_with_fresh_noise_moves_a_linear_student_toward_the_teacher():
    student = LinearStudent(A0, B0)
    obj = MeanFlowDistillation(GaussianFlow(MU, SIG ** 2), student, StudentFlow(student),
                               lambda batch: (batch, None), max_substep=0.05)
    g_a, g_b = _mc_grad(obj, n=200_000)
    assert -g_a > 0.02 and -g_b > 0.02, (g_a, g_b)
    coupled = MeanFlowDistillation(GaussianFlow(MU, SIG ** 2), student, StudentFlow(student),
                                   lambda batch: (batch, None), max_substep=0.05, noise="coupled")
    c_a, _ = _mc_grad(coupled, n=200_000)
    assert abs(c_a - g_a) > 0.05, (c_a, g_a)                    # coupled noise measurably differs


def test_cfg_teacher_one_batch_and_nfe():
    obj = make([0.0] * D, [1.0] * D, cfg_scale=2.0, max_substep=0.1)
    x = torch.zeros(8, D, dtype=torch.float64)
    s = torch.full((8,), 0.2, dtype=torch.float64)
    t = s + torch.linspace(0.0, 0.5, 8, dtype=torch.float64)
    _, logs = obj.student_loss(obj.generate(x, None), torch.randn_like(x), s, t, None)
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


def test_bf16_autocast_keeps_latents_times_and_solver_state_fp32():
    """Under CPU bf16 autocast only the network calls run in bf16: latents, times and the Euler state are fp32,
    and the mean flows match the fp32 ones to bf16 accuracy."""
    from occ_mfd.data.records import OccBatch
    from occ_mfd.models.codec import LatentCodec, LatentPrepare
    from occ_mfd.models.forecaster import OccForecaster
    from occ_mfd.models.vae import OccVAE

    torch.manual_seed(0)
    codec = LatentCodec(OccVAE(grid_z=4, channels=(8, 16), latent_channels=2, downsample=2, sparse=False), 1.0)
    net = OccForecaster(latent_channels=2, past=2, future=3, base_channels=8, channel_mult=(1,),
                        num_res_blocks=1, attn_levels=(), heads=1, mid_attn=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.3)
    obj = MeanFlowDistillation.from_teacher(net, LatentPrepare(codec), cfg_scale=2.0, max_substep=0.1)
    seen = []
    obj.teacher.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[1].dtype)))
    g = torch.Generator().manual_seed(1)
    batch = OccBatch(past=torch.randint(0, 18, (2, 2, 8, 8, 4), generator=g),
                     future=torch.randint(0, 18, (2, 3, 8, 8, 4), generator=g), ego=torch.eye(4).repeat(2, 5, 1, 1))
    s, t = torch.tensor([0.1, 0.5]), torch.tensor([0.6, 0.9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x1, cond = obj.prepare(batch)
        assert x1.dtype == torch.float32 and cond.past_latents.dtype == torch.float32
        x_s = torch.randn(x1.shape, generator=g)
        U_T, U_A, n = obj.mean_flows(x_s, s, t, cond)
        out = obj(batch, "student")
    assert U_T.dtype == U_A.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)   # x and t reach the net in fp32
    R_T, R_A, _ = obj.mean_flows(x_s, s, t, obj.prepare(batch)[1])          # the same in fp32
    for got, ref in ((U_T, R_T), (U_A, R_A)):
        rel = float((got - ref).norm() / ref.norm())
        assert rel < 0.03, rel                                               # bf16 network math: ~1 % error
