"""OccForecaster: consistency properties (condition dropout, trajectory modes, batch independence),
attention backends, adaLN-Zero identity at init, trajectory features."""
import math

import pytest
import torch

from occ_mfd.flow.time_sampling import time_grid
from occ_mfd.models.blocks import SpatialAttnBlock, TemporalAttnBlock
from occ_mfd.models.codec import LatentCodec
from occ_mfd.models.forecaster import ForecastCond, OccForecaster, ego_trajectory
from occ_mfd.models.pipeline import OccForecastPipeline, SamplerSettings
from occ_mfd.models.vae import OccVAE

P, FUT, C, H, W = 2, 3, 4, 6, 5


def _net(**kw):
    torch.manual_seed(0)
    args = dict(latent_channels=C, past=P, future=FUT, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attn_levels=(0, 1), heads=2)
    args.update(kw)
    net = OccForecaster(**args)
    # Zero-initialised outputs / gates would make every property trivially true: randomise them.
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0.0, 0.2)
    return net.eval()


def _inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ego = torch.eye(4).repeat(B, P + FUT, 1, 1)
    ego[:, :, 0, 3] = torch.randn(B, P + FUT, generator=g) * 10
    x = torch.randn(B, FUT, C, H, W, generator=g)
    t = torch.rand(B, generator=g)
    return x, t, ForecastCond(torch.randn(B, P, C, H, W, generator=g), ego)


def test_dropped_samples_ignore_history_and_trajectory():
    net = _net()
    x, t, cond = _inputs()
    drop = torch.tensor([True, False, True])
    cond2 = ForecastCond(cond.past_latents + torch.randn_like(cond.past_latents), cond.ego.clone())
    cond2.ego[:, :P, 1, 3] += 5.0
    with torch.no_grad():
        v1, v2 = net(x, t, cond, drop), net(x, t, cond2, drop)
    assert torch.allclose(v1[drop], v2[drop], atol=1e-5)
    assert (v1[~drop] - v2[~drop]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["past", "future"])
def test_future_trajectory_used_only_in_future_mode(mode):
    net = _net(traj_mode=mode)
    x, t, cond = _inputs()
    cond2 = ForecastCond(cond.past_latents, cond.ego.clone())
    cond2.ego[:, P:, :2, 3] += 3.0                    # perturb future poses only
    with torch.no_grad():
        d = (net(x, t, cond) - net(x, t, cond2)).abs().max().item()
    assert (d > 1e-3) if mode == "future" else (d < 1e-6)


def test_batch_independence():
    net = _net()
    x, t, cond = _inputs()
    x2, t2, c2 = x.clone(), t.clone(), ForecastCond(cond.past_latents.clone(), cond.ego.clone())
    x2[1:] = torch.randn_like(x2[1:]); t2[1:] = 0.3; c2.past_latents[1:] += 1.0; c2.ego[1:, :, 1, 3] += 2.0
    with torch.no_grad():
        a, b = net(x, t, cond), net(x2, t2, c2)
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert (a[1:] - b[1:]).abs().max() > 1e-3


def test_math_backend_matches_default():
    x, t, cond = _inputs()
    a = _net(attn_backend="auto")
    b = _net(attn_backend="math")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(a(x, t, cond), b(x, t, cond), atol=1e-5)


@pytest.mark.slow
def test_math_backend_supports_jvp():
    net = _net(attn_backend="math", base_channels=8, heads=1).double()
    x, t, cond = _inputs(B=1)
    x, t = x.double(), t.double()
    cond = ForecastCond(cond.past_latents.double(), cond.ego.double())
    f = lambda xx, tt: net(xx, tt, cond)
    dx, dt = torch.randn_like(x), torch.ones_like(t)
    _, jvp = torch.func.jvp(f, (x, t), (dx, dt))
    eps = 1e-6
    with torch.no_grad():
        fd = (f(x + eps * dx, t + eps * dt) - f(x - eps * dx, t - eps * dt)) / (2 * eps)
    assert torch.allclose(jvp, fd, rtol=1e-4, atol=1e-5 * fd.abs().max().item())


def test_attention_blocks_are_identity_at_init():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8, 4, 5)
    emb = torch.randn(2, 32)
    for blk in (SpatialAttnBlock(8, 32, heads=2), TemporalAttnBlock(8, 32, heads=2)):
        assert torch.equal(blk(h, emb), h)
        with torch.no_grad():
            blk.ada.bias.normal_()
        assert (blk(h, emb) - h).abs().max() > 1e-3


def test_temporal_attention_mixes_frames_spatial_mixes_locations():
    torch.manual_seed(0)
    h, emb = torch.randn(1, 3, 8, 4, 5), torch.randn(1, 32)
    tb, sb = TemporalAttnBlock(8, 32, heads=2), SpatialAttnBlock(8, 32, heads=2)
    for blk in (tb, sb):
        with torch.no_grad():
            blk.ada.bias.normal_()
    h2 = h.clone(); h2[0, 0, :, 0, 0] += torch.randn(8)   # perturb frame 0 at location (0, 0) (not a constant: LN)
    dt = (tb(h2, emb) - tb(h, emb)).abs()
    assert dt[0, 1:, :, 0, 0].max() > 1e-4 and dt[0, :, :, 1:, :].max() == 0   # other frames, same place only
    ds = (sb(h2, emb) - sb(h, emb)).abs()
    assert ds[0, 0, :, 2, 3].max() > 1e-4 and ds[0, 1:].max() == 0             # same frame, other places only


def test_ego_trajectory_values():
    pose = torch.eye(4)
    yaw = math.pi / 2
    pose[:2, :2] = torch.tensor([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    pose[:2, 3] = torch.tensor([10.0, -5.0])
    assert ego_trajectory(pose[None, None])[0, 0].tolist() == pytest.approx([0.2, -0.1, 0.5], abs=1e-6)


def test_shape_errors_are_clear():
    net = _net()
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="cond shapes"):
        net(x, t, ForecastCond(cond.past_latents[:, :1], cond.ego))


def _with_prior(cond: ForecastCond, seed: int = 5) -> ForecastCond:
    g = torch.Generator().manual_seed(seed)
    B = cond.past_latents.shape[0]
    return ForecastCond(cond.past_latents, cond.ego, torch.randn(B, FUT, C, H, W, generator=g))


def test_prior_is_read_by_kept_samples_and_dropped_with_the_condition():
    net = _net(prior="cv-warp")
    x, t, cond = _inputs()
    cond = _with_prior(cond)
    other = ForecastCond(cond.past_latents, cond.ego, cond.prior_latents + torch.randn_like(cond.prior_latents))
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        v1, v2 = net(x, t, cond, drop), net(x, t, other, drop)
    assert torch.allclose(v1[drop], v2[drop], atol=1e-5)           # CFG's unconditional branch: no prior
    assert (v1[~drop] - v2[~drop]).abs().max() > 1e-3


def test_prior_net_refuses_a_missing_prior_and_a_privileged_prior_in_past_mode():
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="prior_latents"):
        _net(prior="cv-warp")(x, t, cond)
    with pytest.raises(ValueError, match="traj_mode='future'"):
        _net(prior="warp", traj_mode="past")
    with pytest.raises(ValueError, match="prior must be"):
        _net(prior="flow")
    assert _net(prior="warp", traj_mode="future")(x, t, _with_prior(cond)).shape == x.shape


def _s2d(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """(B, T, C, H, W) → (B, T, C·p², H/p, W/p), space-to-depth per frame."""
    return torch.nn.functional.pixel_unshuffle(x.flatten(0, 1), p).unflatten(0, x.shape[:2])


def test_patch2_net_is_the_coarse_net_on_space_to_depth_latents():
    """patch=2 on a (C, 2H, 2W) latent is exactly a patch-1 net with 4C channels on the space-to-depth latents,
    mapped back by depth-to-space (the same weights: the two have identical parameter shapes)."""
    B, Hc, Wc = 2, 4, 6
    kw = dict(past=P, future=FUT, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
              heads=2, prior="cv-warp")
    coarse = _net(latent_channels=4 * C, **kw)
    fine = OccForecaster(latent_channels=C, patch=2, **kw).eval()
    fine.load_state_dict(coarse.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, FUT, C, 2 * Hc, 2 * Wc, generator=g)
    past = torch.randn(B, P, C, 2 * Hc, 2 * Wc, generator=g)
    prior = torch.randn(B, FUT, C, 2 * Hc, 2 * Wc, generator=g)
    ego = torch.eye(4).repeat(B, P + FUT, 1, 1)
    t = torch.rand(B, generator=g)
    with torch.no_grad():
        v_fine = fine(x, t, ForecastCond(past, ego, prior))
        v_coarse = coarse(_s2d(x), t, ForecastCond(_s2d(past), ego, _s2d(prior)))
    expect = torch.nn.functional.pixel_shuffle(v_coarse.flatten(0, 1), 2).unflatten(0, (B, FUT))
    assert v_fine.shape == x.shape
    assert torch.allclose(v_fine, expect, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by patch=2"):
        fine(x[..., :-1], t, ForecastCond(past[..., :-1], ego, prior[..., :-1]))


@pytest.mark.parametrize("t_value", [0.0, 0.3, 0.99])
def test_data_prediction_returns_the_velocity_that_reaches_the_predicted_data(t_value):
    """Same weights: the data-prediction net's velocity is (x̂1 − x_t) / max(1 − t, 0.05), with x̂1 the velocity
    net's raw output."""
    vel = _net()
    data = OccForecaster(**{**vel.init_kwargs, "prediction": "data"}).eval()
    data.load_state_dict(vel.state_dict())
    x, _, cond = _inputs()
    t = torch.full((x.shape[0],), t_value)
    with torch.no_grad():
        expect = (vel(x, t, cond) - x) / max(1 - t_value, 0.05)
        assert torch.allclose(data(x, t, cond), expect, atol=1e-4)


@pytest.mark.parametrize("steps, cfg", [(1, 1.0), (10, 2.0)])
def test_an_untrained_residual_data_prediction_teacher_forecasts_the_warp(steps, cfg):
    """Zero output layer (the init) → x̂1 = 0 residual → every Euler step on the shifted grid lands the state on
    0 at t = 1, and the pipeline returns the prior latents themselves, with or without guidance."""
    assert time_grid(10, 3.0)[-2] < 0.95                          # the clamp never bites on this grid
    torch.manual_seed(0)
    net = OccForecaster(latent_channels=C, past=P, future=FUT, base_channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attn_levels=(1,), heads=2, prior="cv-warp", residual=True,
                        prediction="data").eval()
    vae = OccVAE(grid_z=8, channels=(8, 8), latent_channels=C, downsample=2, sparse=False)
    pipe = OccForecastPipeline(LatentCodec(vae), net, SamplerSettings(steps=steps, shift=3.0, cfg_scale=cfg))
    x, _, cond = _inputs()
    cond = _with_prior(cond)
    with torch.no_grad():
        out = pipe.sample(cond, torch.randn_like(x))
    assert torch.allclose(out, cond.prior_latents, atol=1e-5)
