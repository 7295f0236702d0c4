"""Flow-map students (occ_mfd/models/flow_map.py): the init invariant u(x, s, t) ≡ net(x, s) for every t, a non-zero
gradient on the zero-initialised Δt path, the snapshot round trip, the endpoint, and the JVP of the tiny forecaster
against an fp64 central difference."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import MLPVelocity  # noqa: E402
from occ_mfd.builder import build  # noqa: E402
from occ_mfd.models.flow_map import FlowMapEndpoint, FlowMapNet, flow_map_jvp, is_flow_map  # noqa: E402
from occ_mfd.models.forecaster import ForecastCond, OccForecaster  # noqa: E402
from occ_mfd.models.snapshot import network_spec  # noqa: E402

torch.set_num_threads(1)
B = 3


def _forecaster(seed=0, attn_backend="auto"):
    """A tiny forecaster with attention, its weights perturbed (a trained teacher's output layer is not zero)."""
    torch.manual_seed(seed)
    net = OccForecaster(latent_channels=2, past=2, future=2, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                        attn_levels=(0,), heads=2, attn_backend=attn_backend)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, 2, 2, 4, 4)
    cond = ForecastCond(torch.randn(B, 2, 2, 4, 4), torch.eye(4).expand(B, 4, 4, 4).clone())
    return net, x, cond


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLPVelocity(hidden=16, depth=2), torch.randn(B, 2), None


CASES = {"forecaster": (_forecaster, dict(inject_at="time_mlp", dt_path="time_mlp")),
         "mlp": (_mlp, dict(inject_at="net.0", dt_path="fourier"))}


@pytest.mark.parametrize("case", CASES)
def test_at_init_the_flow_map_is_the_teacher_for_every_t(case):
    make, kw = CASES[case]
    net, x, cond = make()
    fm = FlowMapNet(copy.deepcopy(net), **kw)
    s = torch.tensor([0.0, 0.3, 0.9])
    with torch.no_grad():
        ref = net(x, s, cond)
        for t in (s, torch.tensor([1.0, 0.5, 0.95]), torch.ones(B)):
            assert torch.equal(fm(x, s, t, cond), ref)            # exactly: the Δt path adds zeros
        assert torch.equal(FlowMapEndpoint(fm)(x, s, cond), ref)   # u(x, s, 1)
    assert is_flow_map(FlowMapEndpoint(fm)) and not is_flow_map(net)


@pytest.mark.parametrize("case", CASES)
def test_the_zero_initialised_dt_path_gets_gradient_and_learns_dt(case):
    make, kw = CASES[case]
    net, x, cond = make()
    fm = FlowMapNet(net, **kw)
    last = [m for m in fm.dt_embed.modules() if isinstance(m, nn.Linear)][-1]
    assert float(last.weight.abs().sum()) == 0.0 and float(last.bias.abs().sum()) == 0.0
    s, t1, t2 = torch.full((B,), 0.2), torch.full((B,), 0.4), torch.full((B,), 0.9)
    target = torch.randn_like(x)
    (fm(x, s, t1, cond) * target).sum().backward()
    assert float(last.weight.grad.abs().sum()) > 0 and float(last.bias.grad.abs().sum()) > 0
    with torch.no_grad():
        for p in fm.dt_embed.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
        assert not torch.allclose(fm(x, s, t1, cond), fm(x, s, t2, cond))   # u now depends on t − s


def test_snapshot_spec_rebuilds_the_same_function():
    net, x, cond = _forecaster()
    ep = FlowMapEndpoint(FlowMapNet(net))
    with torch.no_grad():
        for p in ep.flow_map.dt_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))
    spec = network_spec(ep)
    assert spec["class"] == "occ_mfd.models.flow_map.FlowMapEndpoint"
    rebuilt = build({"type": spec["class"], **spec["kwargs"]})
    rebuilt.load_state_dict(ep.state_dict())
    t = torch.tensor([0.0, 0.5, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, cond), ep(x, t, cond), rtol=0, atol=0)


def test_a_network_that_runs_the_injection_point_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.time_mlp = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 2))

        def forward(self, x, t, cond=None, drop_cond=None):
            e = torch.cat([t[:, None]] * 4, 1)
            return x + self.time_mlp(e) + self.time_mlp(e)

    fm = FlowMapNet(Twice())
    with pytest.raises(RuntimeError, match="ran 2 times"):
        fm(torch.zeros(2, 2), torch.zeros(2), torch.ones(2))


def test_jvp_of_the_tiny_forecaster_matches_an_fp64_central_difference():
    """The AYF tangent (dx, ds, dt) = (v, 1, 0) through u(x, s, t): torch.func.jvp (fp32, math SDPA kernel; the net
    itself asks for the "auto" kernel) against (u(p + εv) − u(p − εv)) / 2ε in fp64, ε = 1e-6."""
    net, x, cond = _forecaster(attn_backend="auto")
    fm = FlowMapNet(net)
    with torch.no_grad():
        for p in fm.dt_embed.parameters():
            p.add_(0.1 * torch.randn_like(p))                 # a trained Δt path: d/ds reaches it through t − s
    s, t = torch.tensor([0.1, 0.4, 0.7]), torch.tensor([0.6, 0.9, 0.7])
    v = torch.randn_like(x)
    fn = lambda x_, s_, t_: fm(x_, s_, t_, cond)  # noqa: E731
    tangents = (v, torch.ones(B), torch.zeros(B))
    primal, tangent = flow_map_jvp(fn, (x, s, t), tangents, method="func")
    torch.testing.assert_close(primal, fm(x, s, t, cond).detach())
    fm64, eps = copy.deepcopy(fm).double(), 1e-6
    c64 = ForecastCond(cond.past_latents.double(), cond.ego.double())
    with torch.no_grad():
        p64 = [a.double() for a in (x, s, t)]
        plus = fm64(*(a + eps * b.double() for a, b in zip(p64, tangents)), c64)
        minus = fm64(*(a - eps * b.double() for a, b in zip(p64, tangents)), c64)
    ref = (plus - minus) / (2 * eps)
    rel = float((tangent.double() - ref).norm() / ref.norm())
    assert rel <= 1e-3, rel
    _, fd = flow_map_jvp(fn, (x, s, t), tangents, method="fd")        # the fp32 fallback, ε = 1e-4
    assert float((fd.double() - ref).norm() / ref.norm()) <= 1e-2


def test_flow_map_wrappers_expose_the_wrapped_forecasters_ego_motion_prior_and_residual():
    """The pipeline builds the condition from ``net.prior``: a flow-map student of a prior teacher must ask for
    the same prior (else it would be sampled without the input it was trained on)."""
    torch.manual_seed(0)
    net = OccForecaster(latent_channels=2, past=2, future=2, base_channels=8, channel_mult=(1,), num_res_blocks=1,
                        attn_levels=(), heads=2, prior="cv-warp")
    assert FlowMapEndpoint(FlowMapNet(net)).prior == "cv-warp"
    assert FlowMapEndpoint(FlowMapNet(_forecaster()[0])).prior is None
    residual = OccForecaster(**{**net.init_kwargs, "residual": True})
    assert FlowMapEndpoint(FlowMapNet(residual)).residual and not FlowMapEndpoint(FlowMapNet(net)).residual
