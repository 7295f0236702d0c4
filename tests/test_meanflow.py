"""MeanFlow distillation: the target equals the true average velocity for the exact Gaussian flow map (loss 0 there,
the closed-form c²/(c² + ε) for a map off by c), the exact adaptive-L2 gradient and its sign on a constant field,
the JVP against the finite difference, the time sampler, and bad input."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import MLPVelocity  # noqa: E402
from flow_map_toys import ConstantMap, GaussianMap  # noqa: E402
from occ_mfd.models.flow_map import FlowMapEndpoint  # noqa: E402
from occ_mfd.objectives.meanflow import MeanFlow, adaptive_l2  # noqa: E402
from test_mfd import MU, SIG, GaussianFlow  # noqa: E402
from test_senseflow import ConstantFlow  # noqa: E402

torch.set_num_threads(1)
D = 3


def _gauss(offset=0.0, **kw):
    return MeanFlow(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(offset)), lambda x1: (x1, None), **kw)


def _times(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    t = s + 0.05 + (1.0 - 0.05 - s) * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, s, t


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_the_target_is_the_true_average_velocity(offset):
    """u_tgt = v(x_s, s) + (t − s) du/ds: an offset c does not change du/ds, so for the exact map off by c the target
    is still the exact average velocity (X − x_s)/(t − s), and Δ = c."""
    obj = _gauss(offset)
    x, s, t = _times(64)
    u = obj.flow_map(x, s, t)
    u_tgt, logs = obj.target(x, s, t, None, u)
    exact = GaussianMap()(x, s, t).detach()
    assert float((u_tgt - exact).abs().max()) < 1e-9
    torch.testing.assert_close(u - u_tgt, torch.full_like(u, offset), rtol=0, atol=1e-9)
    assert logs == {"nfe_teacher": 1.0, "nfe_jvp": 2.0}
    fd = _gauss(offset, jvp="fd").target(x, s, t, None, u)[0]                # the central difference, O(ε²)
    assert float((fd - exact).abs().max()) < 1e-6


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_loss_is_zero_for_the_exact_map_and_closed_form_otherwise(offset):
    """On data from the teacher's own distribution the per-sample loss is c²/(c² + ε) for every (s, t), x_s."""
    obj = _gauss(offset)
    torch.manual_seed(0)
    out = obj(MU + SIG * torch.randn(256, 1, dtype=torch.float64))
    expected = offset ** 2 / (offset ** 2 + 0.01)
    assert math.isclose(float(out.loss), expected, rel_tol=1e-9, abs_tol=1e-12)
    assert out.logs["nfe_jvp"] == 2.0 and out.logs["nfe_aux"] == 0.0 and int(obj._updates) == 1


def test_constant_field_gradient_is_exact_and_moves_toward_the_teacher():
    """Teacher v = m, student u = p: du/ds = 0, Δ = p − m; L = ‖Δ‖²/(‖Δ‖² + ε), dL/dp = 2Δ/(‖Δ‖² + ε) exactly."""
    m, p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), [0.0, 1.0, 3.0]
    obj = MeanFlow(ConstantFlow(m), FlowMapEndpoint(ConstantMap(p)), lambda x1: (x1, None))
    torch.manual_seed(0)
    out = obj(torch.randn(32, D, dtype=torch.float64))
    out.loss.backward()
    diff = torch.tensor(p, dtype=torch.float64) - m
    sq = float(diff.pow(2).sum())
    assert math.isclose(float(out.loss), sq / (sq + 0.01), rel_tol=1e-12)
    torch.testing.assert_close(obj.flow_map.p.grad, 2 * diff / (sq + 0.01), rtol=1e-12, atol=0)
    new = obj.flow_map.p.detach() - 0.5 * obj.flow_map.p.grad
    assert (new - m).norm() < diff.norm()                                   # one step toward the teacher
    assert obj.kind == "meanflow" and obj.phase(7) == "student"


def test_adaptive_l2_weights_and_gradient():
    """p = 1: value Σ_b ‖Δ_b‖²/(‖Δ_b‖² + ε) / B, gradient 2Δ/(‖Δ‖² + ε); p = 0: plain summed L2."""
    delta = torch.tensor([[3.0, 4.0], [0.0, 0.1]], dtype=torch.float64, requires_grad=True)
    loss, sq = adaptive_l2(delta, 1.0, 0.01)
    torch.testing.assert_close(sq, torch.tensor([25.0, 0.01], dtype=torch.float64))
    assert math.isclose(float(loss), (25 / 25.01 + 0.01 / 0.02) / 2, rel_tol=1e-12)
    loss.backward()
    torch.testing.assert_close(delta.grad, torch.stack([2 * delta[0] / 25.01, 2 * delta[1] / 0.02]).detach() / 2)
    plain, _ = adaptive_l2(delta.detach(), 0.0, 0.01)
    assert math.isclose(float(plain), 25.01 / 2, rel_tol=1e-12)


def test_time_sampler_presets_and_warmup():
    """Default: FastGen's distillation times + 25 % at t = 1 (always s < t); "meanflow": the official sampler with
    25 % at s = t (study row meanflow_official); an optional tangent warm-up scales the (t − s) du/ds term."""
    make = lambda **kw: MeanFlow(ConstantFlow([0.0] * D), FlowMapEndpoint(ConstantMap([0.0] * D)),  # noqa: E731
                                 lambda x1: (x1, None), **kw)
    default, official = make(), make(time_sampler="meanflow")
    torch.manual_seed(0)
    s, t = default.sample_times(100_000, "cpu", torch.float64)
    assert (s < t).all() and abs(float((t == 1).double().mean()) - 0.25) < 0.005
    s, t = official.sample_times(100_000, "cpu", torch.float64)
    assert abs(float((s == t).double().mean()) - 0.25) < 0.005 and not (t == 1).any()
    assert default.warmup() == 1.0                                          # H = 0: the full target at once
    obj = _gauss(0.0, warmup_updates=4)
    x, s, t = _times(16)
    u = obj.flow_map(x, s, t)
    u_tgt0 = obj.target(x, s, t, None, u)[0]                                # r_0 = 0: the target is v(x_s, s)
    torch.testing.assert_close(u_tgt0, GaussianFlow(MU, SIG ** 2)(x, s))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="interval input"):
        MeanFlow(ConstantFlow([0.0]), MLPVelocity(), lambda b: (b, None))
    with pytest.raises(ValueError, match="norm_eps"):
        MeanFlow(ConstantFlow([0.0]), FlowMapEndpoint(ConstantMap([0.0])), lambda b: (b, None), norm_eps=0.0)
    with pytest.raises(ValueError, match="time_sampler"):
        MeanFlow(ConstantFlow([0.0]), FlowMapEndpoint(ConstantMap([0.0])), lambda b: (b, None), time_sampler="x")
