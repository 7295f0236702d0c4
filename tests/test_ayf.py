"""AYF-EMD: the exact gradient and its sign on a constant field, the Eulerian residual vanishing for the exact
Gaussian flow map (sign of d/ds and of the (t − s) term), warm-up and times, the JVP fallback, and the occupancy
stage end to end (snapshot kind, flow-map loading, clear errors)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import MLPVelocity  # noqa: E402
from flow_map_toys import ConstantMap, NoForwardAD  # noqa: E402
from occ_mfd.builder import build  # noqa: E402
from occ_mfd.data.records import collate_sequences  # noqa: E402
from occ_mfd.data.sequences import OccSequenceDataset  # noqa: E402
from occ_mfd.engine.checkpoint import load_checkpoint, load_config_from_checkpoint  # noqa: E402
from occ_mfd.engine.loop import train  # noqa: E402
from occ_mfd.eval.forecasters import load_forecaster  # noqa: E402
from occ_mfd.models.flow_map import FlowMapEndpoint  # noqa: E402
from occ_mfd.models.snapshot import load_snapshot, save_snapshot  # noqa: E402
from occ_mfd.objectives.ayf import AlignYourFlow, OccAlignYourFlow, flow_map_student  # noqa: E402
from stage_fixtures import stage_config  # noqa: E402
from test_mfd import MU, SIG, GaussianFlow, gauss_velocity  # noqa: E402
from test_senseflow import ConstantFlow  # noqa: E402

torch.set_num_threads(1)
D = 3



def test_constant_field_gradient_is_exact_and_moves_toward_the_teacher():
    """Teacher v = m, student u = p: du/ds = 0, so g = p − m for every sample and time, and
    dL/dp = 2 (p − m) / (‖p − m‖ + c) exactly."""
    m, p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), [0.0, 1.0, 3.0]
    obj = AlignYourFlow(ConstantFlow(m), FlowMapEndpoint(ConstantMap(p)), lambda x1: (x1, None), warmup_updates=0)
    torch.manual_seed(0)
    out = obj(torch.randn(32, D, dtype=torch.float64))
    out.loss.backward()
    diff = torch.tensor(p, dtype=torch.float64) - m
    torch.testing.assert_close(obj.flow_map.p.grad, 2 * diff / (diff.norm() + 0.1), rtol=1e-12, atol=0)
    assert math.isclose(float(out.loss), float((diff / (diff.norm() + 0.1)).pow(2).sum()), rel_tol=1e-12)
    new = obj.flow_map.p.detach() - 0.5 * obj.flow_map.p.grad
    assert (new - m).norm() < diff.norm()                                   # one step toward the teacher
    assert obj.kind == "ayf" and obj.phase(3) == "student" and out.logs["nfe_aux"] == 0.0


class ExactGaussianMap(nn.Module):
    """The exact flow map of the 1-D FM path to N(mu, sigma^2): x_t − t mu = (r_t / r_s)(x_s − s mu), with
    r_t² = (1 − t)² + t² sigma²; u = (X − x) / (t − s) for s < t."""

    def forward(self, x, s, t, cond=None, drop_cond=None):
        r = lambda tau: torch.sqrt((1 - tau) ** 2 + tau ** 2 * SIG ** 2)[:, None]  # noqa: E731
        X = t[:, None] * MU + r(t) / r(s) * (x - s[:, None] * MU)
        return (X - x) / (t - s)[:, None]


def test_the_eulerian_residual_vanishes_for_the_exact_flow_map():
    obj = AlignYourFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(ExactGaussianMap()), lambda x1: (x1, None))
    g_ = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, generator=g_, dtype=torch.float64)
    s = 0.8 * torch.rand(64, generator=g_, dtype=torch.float64)
    t = s + 0.05 + (0.95 - s) * torch.rand(64, generator=g_, dtype=torch.float64)
    g, exact = obj.residual(x, s, t, None, r=1.0)
    assert exact and float(g.abs().max()) < 1e-9                            # u = v + (t − s) du/ds holds
    g0, _ = obj.residual(x, s, t, None, r=0.0)                              # without the transport term: u − v
    v = gauss_velocity(x, s, MU, SIG ** 2)
    torch.testing.assert_close(g0, ExactGaussianMap()(x, s, t) - v)
    assert float(g0.abs().mean()) > 0.1
    obj_fd = AlignYourFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(ExactGaussianMap()), lambda x1: (x1, None),
                           jvp="fd")
    g_fd, exact_fd = obj_fd.residual(x, s, t, None, r=1.0)
    assert not exact_fd and float(g_fd.abs().max()) < 1e-6                 # the difference: O(eps²)


def test_warmup_and_time_sampler():
    obj = AlignYourFlow(ConstantFlow([0.0] * D), FlowMapEndpoint(ConstantMap([0.0] * D)), lambda x1: (x1, None),
                        warmup_updates=4, time_sampler="meanflow")          # the previous default, kept as an option
    rs = []
    for _ in range(6):
        rs.append(obj.warmup())
        obj(torch.zeros(4, D, dtype=torch.float64))
    assert rs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0] and int(obj.state_dict()["_updates"]) == 6
    torch.manual_seed(0)
    s, t = obj.sample_times(40_000, "cpu", torch.float64)
    assert (s <= t).all() and abs(float((s < t).double().mean()) - 0.75) < 0.01
    # a, b ~ sigmoid(N(0.4, 1)): E[a] ≈ 0.5808 (quadrature), so E[(s + t)/2] over the s < t part ≈ that
    lt = s < t
    assert abs(float(((s[lt] + t[lt]) / 2).mean()) - 0.5808) < 0.01


def _normal_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _p_near_endpoint(mean, std, s_neq_t, endpoint, lo=0.1, hi=0.9):
    """P(s < lo and t > hi) in closed form: a, b ~ sigmoid(N(mean, std²)) i.i.d., s = min, t = max, then t := 1 for
    a fraction ``endpoint`` and t := s for 1 − s_neq_t. P(min < lo, max > hi) = 2 p q (one draw cannot be both)."""
    logit = lambda u: math.log(u / (1 - u))  # noqa: E731
    p, q = _normal_cdf((logit(lo) - mean) / std), 1 - _normal_cdf((logit(hi) - mean) / std)
    return endpoint * (1 - (1 - p) ** 2) + (s_neq_t - endpoint) * 2 * p * q


def test_the_default_time_sampler_trains_the_one_step_endpoint():
    """The one-step sampler evaluates X(z, 0, 1). The previous default ("meanflow": sigmoid(N(0.4, 1)), 25 % at
    s = t) draws (s < 0.1, t > 0.9) with probability 0.026 % (closed form), so the endpoint was left to extrapolation
    (study ED toy 0.31, conditional 1.02, worse than the start). The default "fastgen_endpoint" (sigmoid(N(0.8, 1.6)),
    always s < t, 25 % at t = 1) draws it with probability 2.4 %."""
    make = lambda **kw: AlignYourFlow(ConstantFlow([0.0] * D), FlowMapEndpoint(ConstantMap([0.0] * D)),  # noqa: E731
                                      lambda x1: (x1, None), **kw)
    default, old = make(), make(time_sampler="meanflow")
    assert (default.time_mean, default.time_std, default.s_neq_t_ratio, default.endpoint_ratio) == (0.8, 1.6, 1.0, 0.25)
    assert (old.time_mean, old.time_std, old.s_neq_t_ratio, old.endpoint_ratio) == (0.4, 1.0, 0.75, 0.0)
    torch.manual_seed(0)
    s, t = default.sample_times(200_000, "cpu", torch.float64)
    assert (s < t).all() and abs(float((t == 1).double().mean()) - 0.25) < 0.005
    near = float(((s < 0.1) & (t > 0.9)).double().mean())
    p_default, p_old = _p_near_endpoint(0.8, 1.6, 1.0, 0.25), _p_near_endpoint(0.4, 1.0, 0.75, 0.0)
    assert abs(p_default - 0.02378) < 1e-4 and abs(p_old - 0.000256) < 1e-5      # hand-evaluated closed forms
    assert abs(near - p_default) < 0.002 and near > 50 * p_old
    s, t = old.sample_times(200_000, "cpu", torch.float64)
    assert abs(float(((s < 0.1) & (t > 0.9)).double().mean()) - p_old) < 2e-4
    # overrides win over the preset; the t = 1 and s = t buckets must be disjoint
    assert make(time_sampler="meanflow", endpoint_ratio=0.1).endpoint_ratio == 0.1
    with pytest.raises(ValueError, match="endpoint_ratio"):
        make(time_sampler="meanflow", endpoint_ratio=0.9)
    with pytest.raises(ValueError, match="time_sampler"):
        make(time_sampler="sCM")



def test_auto_falls_back_to_the_finite_difference_and_matches_func():
    torch.manual_seed(0)
    student = flow_map_student(MLPVelocity(hidden=16, depth=2).double(), inject_at="net.0", dt_path="fourier")
    with torch.no_grad():
        for p in student.flow_map.dt_embed.parameters():
            p.add_(0.3 * torch.randn_like(p))
    teacher = MLPVelocity(hidden=16, depth=2).double()
    x, s = torch.randn(8, 2, dtype=torch.float64), torch.full((8,), 0.2, dtype=torch.float64)
    t = torch.full((8,), 0.7, dtype=torch.float64)
    g_func, _ = AlignYourFlow(teacher, student, lambda b: (b, None), jvp="func").residual(x, s, t, None, 1.0)
    g_fd, _ = AlignYourFlow(teacher, student, lambda b: (b, None), jvp="fd").residual(x, s, t, None, 1.0)
    torch.testing.assert_close(g_fd, g_func, rtol=1e-6, atol=1e-7)

    class Blocked(nn.Module):
        def __init__(self, fm):
            super().__init__()
            self.fm = fm

        def forward(self, x, s, t, cond=None, drop_cond=None):
            return NoForwardAD.apply(self.fm(x, s, t, cond))

    blocked = FlowMapEndpoint(Blocked(student.flow_map))
    with pytest.raises((RuntimeError, NotImplementedError)):
        AlignYourFlow(teacher, blocked, lambda b: (b, None), jvp="func").residual(x, s, t, None, 1.0)
    auto = AlignYourFlow(teacher, blocked, lambda b: (b, None), jvp="auto")
    g_auto, exact = auto.residual(x, s, t, None, 1.0)
    assert not exact and auto._jvp_method == "fd"
    torch.testing.assert_close(g_auto, g_func, rtol=1e-6, atol=1e-7)


def test_a_velocity_student_is_refused():
    with pytest.raises(ValueError, match="interval input"):
        AlignYourFlow(ConstantFlow([0.0]), MLPVelocity(), lambda b: (b, None))


def test_occ_ayf_starts_as_the_teacher_trains_and_loads_as_a_flow_map(stages, tmp_path):
    tmp, data = stages
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / "configs/tiny/ayf.py"))
    obj_cfg = {**cfg.objective.to_dict(), "teacher_snapshot": str(tmp / "teacher")}
    # at init the flow map's one-step sample is the teacher's one-step Euler jump (unguided), exactly
    ayf = OccAlignYourFlow(**{k: v for k, v in obj_cfg.items() if k != "type"})
    ds = OccSequenceDataset(str(data), split="train", past=4, future=6, pool=1, mask=None)
    batch = collate_sequences([ds[0], ds[1]])
    x1, cond = ayf.prepare(batch)
    z = torch.randn_like(x1)
    with torch.no_grad():
        torch.testing.assert_close(ayf.generate(z, cond), z + ayf.teacher(z, torch.zeros(2), cond), rtol=0, atol=0)
    train(stage_config(data, obj_cfg, dict(student=dict(lr=1e-3, grad_clip=1.0)), 3), tmp_path / "ayf")
    pipe, info = load_forecaster(tmp_path / "ayf")
    assert (info.kind, info.steps, info.cfg_scale, info.flow_map) == ("ayf", 1, 1.0, True)
    assert isinstance(pipe.net, FlowMapEndpoint)
    teacher = load_snapshot(tmp / "teacher").weights["net"]
    trained = pipe.net.flow_map.net.state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in trained.items())   # it trained
    # the stored config rebuilds without the teacher's files, and the warm-up counter resumes from the checkpoint
    stored = build(load_config_from_checkpoint(tmp_path / "ayf/latest.pt").objective)
    stored.load_state_dict(load_checkpoint(tmp_path / "ayf/latest.pt")["objective"])
    assert stored.kind == "ayf" and int(stored._updates) == 3 and stored.warmup() == 3 / 16
    # a flow-map kind whose network has no interval input is a clear error
    snap = load_snapshot(tmp / "teacher")
    snap.kind = "ayf"
    save_snapshot(snap, tmp_path / "fake_ayf.pt")
    with pytest.raises(ValueError, match="no interval input"):
        load_forecaster(tmp_path / "fake_ayf.pt")
