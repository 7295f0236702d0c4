"""Terminal Velocity Matching: the loss vanishes for the exact Gaussian flow map and is the closed form
c²(1 − β(t)(t − s))² + c² for a map off by c, the gradient really goes through the JVP (against a finite difference
of the loss in the weights, and unlike a detached JVP), the exact gradient and sign on a constant field, the gap
sampler, and bad input."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import MLPVelocity  # noqa: E402
from flow_map_toys import ConstantMap, GaussianMap, gauss_beta  # noqa: E402
from occ_mfd.objectives.ayf import flow_map_student  # noqa: E402
from occ_mfd.models.flow_map import FlowMapEndpoint  # noqa: E402
from occ_mfd.objectives.tvm import TerminalVelocityMatching  # noqa: E402
from test_mfd import MU, SIG, GaussianFlow  # noqa: E402
from test_senseflow import ConstantFlow  # noqa: E402

torch.set_num_threads(1)
D = 3


def _fixed_times(obj, s, t):
    obj.sample_times = lambda B, device, dtype=torch.float32: (s.to(dtype), t.to(dtype))   # test hook
    return obj


@pytest.mark.parametrize("offset", [0.0, 0.3])
def test_loss_is_zero_for_the_exact_map_and_closed_form_otherwise(offset):
    """X' = X + (t − s)c: ∂_t X' − v(X', t) = c − β(t)(t − s)c (v is linear in x with slope β); u'(x, s, s) − v = c."""
    g = torch.Generator().manual_seed(0)
    s = 0.6 * torch.rand(64, generator=g, dtype=torch.float64)
    t = s + (1 - s) * torch.rand(64, generator=g, dtype=torch.float64)
    obj = _fixed_times(TerminalVelocityMatching(GaussianFlow(MU, SIG ** 2), FlowMapEndpoint(GaussianMap(offset)),
                                                lambda x1: (x1, None)), s, t)
    out = obj(MU + SIG * torch.randn(64, 1, generator=g, dtype=torch.float64))
    expected = float((offset ** 2 * (1 - gauss_beta(t) * (t - s)) ** 2 + offset ** 2).mean())
    assert math.isclose(float(out.loss), expected, rel_tol=1e-9, abs_tol=1e-15)
    assert out.logs["nfe_jvp"] == 2.0 and out.logs["nfe_teacher"] == 2.0 and out.logs["nfe_aux"] == 0.0


def test_constant_field_gradient_is_exact_and_moves_toward_the_teacher():
    """Teacher v = m, student u = p: ∂_t u = 0, ∂_t X = p; L = mean((p − m)²) twice, dL/dp = 4 (p − m)/D."""
    m, p = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), [0.0, 1.0, 3.0]
    obj = TerminalVelocityMatching(ConstantFlow(m), FlowMapEndpoint(ConstantMap(p)), lambda x1: (x1, None))
    torch.manual_seed(0)
    out = obj(torch.randn(32, D, dtype=torch.float64))
    out.loss.backward()
    diff = torch.tensor(p, dtype=torch.float64) - m
    assert math.isclose(float(out.loss), 2 * float(diff.pow(2).mean()), rel_tol=1e-12)
    torch.testing.assert_close(obj.flow_map.p.grad, 4 * diff / D, rtol=1e-12, atol=0)
    assert (obj.flow_map.p.detach() - 0.1 * obj.flow_map.p.grad - m).norm() < diff.norm()
    assert obj.kind == "tvm"


class Replay(torch.nn.Module):
    """The teacher's outputs of the first forward, replayed in order afterwards: the stop-gradient target held fixed
    while a finite difference perturbs the student (sg(v_T(X)) moves with X otherwise)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.outputs, self.calls = net, [], 0

    def forward(self, x, t, cond=None, drop_cond=None):
        if self.calls < len(self.outputs):
            out = self.outputs[self.calls]
        else:
            out = self.net(x, t, cond)
            self.outputs.append(out.detach())
        self.calls += 1
        return out


def _mlp_tvm(jvp="func"):
    torch.manual_seed(0)
    student = flow_map_student(MLPVelocity(hidden=16, depth=2).double(), inject_at="net.0", dt_path="fourier")
    with torch.no_grad():
        for p in student.flow_map.dt_embed.parameters():
            p.add_(0.3 * torch.randn_like(p))                # a Δt path that has learned something
    teacher = Replay(MLPVelocity(hidden=16, depth=2).double())
    s, t = torch.tensor([0.1, 0.3, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.6, 0.9, 0.8, 1.0],
                                                                                    dtype=torch.float64)
    return _fixed_times(TerminalVelocityMatching(teacher, student, lambda b: (b, None), jvp=jvp), s, t)


def _loss(obj, x1, seed=5):
    torch.manual_seed(seed)                                  # the same fresh noise every call
    obj.teacher.calls = 0                                    # the first call's teacher values, replayed
    return obj(x1).loss


def test_the_gradient_goes_through_the_jvp():
    """dL/dθ of the Δt path's weights against a central difference of L in those weights (fp64, the teacher's target
    held at its first value, as the stop-gradient holds it), and different from
    the gradient with the JVP's tangent detached (what MeanFlow-style objectives do); the finite-difference JVP
    backend gives the same gradient."""
    obj = _mlp_tvm()
    x1 = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = obj.flow_map.dt_embed.weight
    _loss(obj, x1).backward()
    grad = w.grad.clone()
    fd = torch.zeros_like(w)
    eps = 1e-6
    with torch.no_grad():
        for idx in [(0, 0), (3, 1), (7, 4), (11, 8), (15, 2)]:
            w[idx] += eps
            plus = float(_loss(obj, x1))
            w[idx] -= 2 * eps
            minus = float(_loss(obj, x1))
            w[idx] += eps
            fd[idx] = (plus - minus) / (2 * eps)
    picked = fd != 0
    torch.testing.assert_close(grad[picked], fd[picked], rtol=1e-5, atol=1e-9)
    # detaching the tangent changes the gradient: the test would catch an objective that stopped the JVP's graph
    detached = _mlp_tvm()
    inner = detached._jvp_backend

    def no_graph(fn, primals, tangents, with_grad=False):
        u, du = inner(fn, primals, tangents, with_grad=True)
        return u, du.detach()

    detached._jvp_backend = no_graph
    _loss(detached, x1).backward()
    assert float((detached.flow_map.dt_embed.weight.grad - grad).abs().max()) > 1e-3 * float(grad.abs().max())
    via_fd = _mlp_tvm(jvp="fd")
    _loss(via_fd, x1).backward()
    torch.testing.assert_close(via_fd.flow_map.dt_embed.weight.grad, grad, rtol=1e-4, atol=1e-6)


def test_gap_sampler():
    """s, t = min, max of two sigmoid(N(0, 1)): P(t < ½) = ¼, P(s < ½) = ¾, E[s] + E[t] = 2·E[sigmoid(N(0, 1))] = 1,
    never s = t, never t = 1 (the default; AYF's presets, e.g. "fastgen_endpoint", are accepted too)."""
    obj = TerminalVelocityMatching(ConstantFlow([0.0] * D), FlowMapEndpoint(ConstantMap([0.0] * D)),
                                   lambda b: (b, None))
    assert obj.time_sampler == "gap" and (obj.time_mean, obj.time_std, obj.s_neq_t_ratio) == (0.0, 1.0, 1.0)
    torch.manual_seed(0)
    s, t = obj.sample_times(200_000, "cpu", torch.float64)
    assert (s < t).all() and not (t == 1).any()
    assert abs(float((t < 0.5).double().mean()) - 0.25) < 0.005 and abs(float((s < 0.5).double().mean()) - 0.75) < 0.005
    assert abs(float(s.mean() + t.mean()) - 1.0) < 0.005
    other = TerminalVelocityMatching(ConstantFlow([0.0] * D), FlowMapEndpoint(ConstantMap([0.0] * D)),
                                     lambda b: (b, None), time_sampler="fastgen_endpoint")
    assert other.endpoint_ratio == 0.25


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="interval input"):
        TerminalVelocityMatching(ConstantFlow([0.0]), MLPVelocity(), lambda b: (b, None))
    with pytest.raises(ValueError, match="time_sampler"):
        TerminalVelocityMatching(ConstantFlow([0.0]), FlowMapEndpoint(ConstantMap([0.0])), lambda b: (b, None),
                                 time_sampler="sCM")
