"""occ_mfd.flow: path, time sampling/grids, Euler solver, CFG, FM objective — against closed forms."""
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from occ_mfd.objectives.flow_matching import FlowMatchingObjective, flow_matching_loss
from occ_mfd.flow.guidance import guided, repeat_batch
from occ_mfd.flow.path import LinearPath
from occ_mfd.flow.solver import euler_integrate, euler_mean_velocity
from occ_mfd.flow.time_sampling import LogitNormalTime, UniformTime, shift_time, time_grid

torch.set_num_threads(1)


def test_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g)
    p = LinearPath()
    assert torch.allclose(p.interpolate(x0, x1, torch.zeros(4)), x0)
    assert torch.allclose(p.interpolate(x0, x1, torch.ones(4)), x1)
    t = torch.tensor([0.1, 0.25, 0.5, 0.9])
    ps = p.sample(x0, x1, t)
    # finite difference of the path in t equals the target velocity
    eps = 1e-3
    fd = (p.interpolate(x0, x1, t + eps) - p.interpolate(x0, x1, t - eps)) / (2 * eps)
    assert torch.allclose(fd, ps.dx_t, atol=1e-3)
    assert torch.allclose(ps.x_t[1], 0.75 * x0[1] + 0.25 * x1[1])
    assert torch.allclose(LinearPath.velocity_to_x1(ps.x_t, ps.dx_t, t), x1, atol=1e-6)
    with pytest.raises(ValueError):
        p.sample(x0, x1[:, :2], t)


def test_logit_normal_and_uniform_moments():
    g = torch.Generator().manual_seed(1)
    t = LogitNormalTime(0.5, 0.8)(200_000, generator=g)
    z = torch.logit(t.double())
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.std().item() - 0.8) < 0.01
    assert (t > 0).all() and (t < 1).all()
    u = UniformTime()(200_000, generator=g)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002


def test_time_grid_shift_matches_sd3_sigma_shift():
    a = 3.0
    g = time_grid(10, a, dtype=torch.float64)
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    sigma = 1 - u
    sigma_shifted = a * sigma / (1 + (a - 1) * sigma)  # SD3 formula in the noise-at-1 convention
    assert torch.allclose(g, 1 - sigma_shifted, atol=1e-12)
    assert g[0] == 0 and g[-1] == 1
    d = torch.diff(g)
    assert (d > 0).all()
    assert (torch.diff(d) > 0).all()  # step sizes strictly increase toward data (t = 1)
    # first/last step ratio: derivative 1/a at t=0 vs a at t=1 → ratio about a^2 for fine grids
    gf = time_grid(1000, a, dtype=torch.float64)
    df = torch.diff(gf)
    assert abs(df[-1] / df[0] - a * a) / (a * a) < 0.02
    assert torch.allclose(time_grid(4, 1.0), torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))
    # shift < 1 reverses the ordering; shift_time is the inverse of shift 1/a
    assert torch.allclose(shift_time(shift_time(u, a), 1 / a), u, atol=1e-12)


def test_euler_exact_on_constant_field():
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    x = torch.randn(2, 2)
    out = euler_integrate(lambda x, t: c.expand_as(x), x, time_grid(7, 3.0))
    assert torch.allclose(out, x + c, atol=1e-6)
    # per-sample intervals
    s, t = torch.tensor([0.1, 0.4]), torch.tensor([0.7, 0.4])
    mv = euler_mean_velocity(lambda x, t: c.expand_as(x), x, s, t, h=0.05)
    assert mv.nfe == math.ceil(0.6 / 0.05)
    assert torch.allclose(mv.mean_velocity, c) and torch.allclose(mv.displacement[1], torch.zeros(2))
    assert torch.allclose(mv.displacement[0], 0.6 * c[0], atol=1e-6)


def test_euler_affine_ode_equals_hand_recursion():
    # dx/dt = A x + b t  (time-dependent affine), grid per sample
    A = torch.tensor([[0.0, 1.0], [-2.0, -0.3]], dtype=torch.float64)
    b = torch.tensor([1.0, 0.5], dtype=torch.float64)
    fn = lambda x, t: x @ A.T + t[:, None] * b
    x = torch.tensor([[1.0, 0.0], [0.2, -1.0]], dtype=torch.float64)
    grid = torch.tensor([[0.0, 0.1, 0.3, 0.6], [0.2, 0.3, 0.4, 0.5]], dtype=torch.float64)
    out = euler_integrate(fn, x, grid)
    for i in range(2):
        y = x[i].numpy().copy()
        for k in range(3):
            tk, dt = grid[i, k].item(), (grid[i, k + 1] - grid[i, k]).item()
            y = y + dt * (A.numpy() @ y + tk * b.numpy())
        assert np.allclose(out[i].numpy(), y, atol=1e-12)


def test_euler_first_order_convergence_on_linear_field():
    from scipy.linalg import expm
    A = np.array([[-1.0, 2.0], [-2.0, -0.5]])
    At = torch.tensor(A)
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    s, t = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.9], dtype=torch.float64)
    exact = expm(A * 0.7) @ x[0].numpy()
    errs = []
    for h in [0.02, 0.01, 0.005, 0.0025]:
        mv = euler_mean_velocity(lambda y, tau: y @ At.T, x, s, t, h)
        errs.append(np.linalg.norm((x + mv.displacement)[0].numpy() - exact))
        # mean velocity is displacement / length
        assert torch.allclose(mv.mean_velocity * 0.7, mv.displacement, atol=1e-12)
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(0.9 < r < 1.1 for r in rates), rates
    assert errs[-1] < 0.01


@dataclass
class Cond:
    a: torch.Tensor
    b: dict
    name: str = "x"


def test_repeat_batch_structures():
    c = Cond(a=torch.arange(3.0), b={"p": torch.ones(3, 2) * torch.arange(3.0)[:, None], "q": None})
    r = repeat_batch(c, 2)
    assert torch.equal(r.a, torch.tensor([0, 1, 2, 0, 1, 2.0]))
    assert r.b["p"].shape == (6, 2) and torch.equal(r.b["p"][3:], c.b["p"]) and r.b["q"] is None
    assert r.name == "x"
    assert repeat_batch(None, 3) is None
    assert torch.equal(repeat_batch([torch.tensor([1, 2])], 2)[0], torch.tensor([1, 2, 1, 2]))


class FakeNet(torch.nn.Module):
    """v = x * t + cond (conditional) or -x (unconditional); counts calls and batch sizes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond, drop_cond=None):
        self.calls.append(x.shape[0])
        v_c = x * t[:, None] + cond
        if drop_cond is None:
            return v_c
        return torch.where(drop_cond[:, None], -x, v_c)


def test_guided_one_batch_and_formula():
    net = FakeNet()
    x, t, c = torch.randn(5, 2), torch.rand(5), torch.randn(5, 2)
    v = guided(net, 2.5)(x, t, c)
    v_c, v_u = x * t[:, None] + c, -x
    assert torch.allclose(v, v_u + 2.5 * (v_c - v_u), atol=1e-6)
    assert net.calls == [10]
    net.calls.clear()
    assert torch.allclose(guided(net, 1.0)(x, t, c), v_c)
    assert net.calls == [5]


def test_fm_loss_zero_at_exact_velocity_and_gradient_sign():
    # x1 a fixed point a: v*(x_t, t) = (a - x_t) / (1 - t)
    a = torch.tensor([2.0, -1.0])
    exact = lambda x, t, cond: (a - x) / (1 - t[:, None])
    B = 256
    x1 = a.expand(B, 2)
    t = torch.rand(B) * 0.98
    assert flow_matching_loss(exact, x1, None, t).item() < 1e-10

    class Offset(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Parameter(torch.tensor([0.3, 0.0]))

        def forward(self, x, t, cond, drop_cond=None):
            return (a - x) / (1 - t[:, None]) + self.c

    net = Offset()
    obj = FlowMatchingObjective(net, lambda batch: (batch, None))
    out = obj(x1, "main")
    out.loss.backward()
    # L = mean(c^2) over elements, dL/dc = c (2/2); positive offset → positive gradient, zero stays zero
    assert torch.allclose(net.c.grad, torch.tensor([0.3, 0.0]), atol=1e-6)
    assert set(obj.param_groups()) == {"main"} and obj.ema_modules()["net"] is net


def test_fm_objective_mask_and_cond_drop():
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, x, t, cond, drop_cond=None):
            seen["drop"] = drop_cond
            return torch.zeros_like(x)

    B = 4000
    x1 = torch.zeros(B, 2)
    mask = torch.tensor([1.0, 0.0]).expand(B, 2)
    obj = FlowMatchingObjective(Spy(), lambda b: (b, None, mask), cond_drop_prob=0.3)
    out = obj(x1, "main")
    # target v = x1 - x0 = -x0, prediction 0 → masked mean of x0[:,0]^2 ≈ 1
    assert abs(out.loss.item() - 1.0) < 0.08
    assert abs(seen["drop"].float().mean().item() - 0.3) < 0.03
