"""LatentCodec / LatentPrepare / OccForecastPipeline, against closed-form fields and a hand-written Euler loop."""
import pytest
import torch

from occ_mfd.data.records import OccBatch
from occ_mfd.eval.baselines import cv_warp
from occ_mfd.flow.time_sampling import time_grid
from occ_mfd.grid import GridSpec
from occ_mfd.models.codec import LatentCodec, LatentPrepare
from occ_mfd.models.forecaster import ForecastCond, OccForecaster
from occ_mfd.models.pipeline import OccForecastPipeline, SamplerSettings
from occ_mfd.models.vae import OccVAE
from occ_mfd.objectives.flow_matching import FlowMatchingObjective

B, P, FUT, X, Z = 2, 2, 3, 8, 4


def _codec(scale=10.0):
    torch.manual_seed(0)
    return LatentCodec(OccVAE(grid_z=Z, channels=(8, 16), latent_channels=2, downsample=2), scale=scale)


def _batch():
    g = torch.Generator().manual_seed(0)
    ego = torch.eye(4).repeat(B, P + FUT, 1, 1)
    ego[:, :, 0, 3] = torch.arange(P + FUT) - (P - 1.0)                      # 1 m per frame forward
    return OccBatch(past=torch.randint(0, 18, (B, P, X, X, Z), generator=g),
                    future=torch.randint(0, 18, (B, FUT, X, X, Z), generator=g), ego=ego)


def _net(seed=1):
    torch.manual_seed(seed)
    net = OccForecaster(latent_channels=2, past=P, future=FUT, base_channels=8, channel_mult=(1, 2),
                        num_res_blocks=1, attn_levels=(1,), heads=2)
    with torch.no_grad():  # the output layer is zero-initialised: give it weights so v depends on everything
        net.out.weight.normal_(0, 0.1)
        net.out.bias.normal_(0, 0.1)
    return net.eval()


def test_codec_scales_and_decodes_argmax():
    codec = _codec(scale=10.0)
    batch = _batch()
    lat = codec.encode(batch.past)                                            # (B, P, C, H, W)
    ref = codec.vae.encode(batch.past[:, 0]).mean
    assert torch.allclose(lat[:, 0], 10.0 * ref, atol=1e-6)
    ids = codec.decode(lat)
    assert ids.dtype == torch.uint8
    assert torch.equal(ids[:, 1].long(), codec.vae.decode(lat[:, 1] / 10.0).argmax(1))
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training


def test_prepare_returns_future_latents_and_past_condition():
    codec = _codec(scale=10.0)
    batch = _batch()
    x1, cond = LatentPrepare(codec)(batch)
    assert torch.equal(x1, codec.encode(batch.future)) and torch.equal(cond.past_latents, codec.encode(batch.past))
    assert torch.equal(cond.ego, batch.ego)


class ConstantField(torch.nn.Module):
    """v = c (cond) or u (uncond, drop_cond): Euler is exact → x1 = x0 + v_u + s·(v_c − v_u)."""

    def __init__(self, c, u):
        super().__init__()
        self.c, self.u, self.calls = c, u, 0

    def forward(self, x, t, cond, drop_cond=None):
        self.calls += 1
        assert isinstance(cond, ForecastCond) and cond.past_latents.shape[0] == x.shape[0]
        v = torch.full_like(x, self.c)
        if drop_cond is not None:
            v[drop_cond] = self.u
        return v


@pytest.mark.parametrize("scale,steps,fused", [(1.0, 1, True), (2.0, 4, True), (2.0, 3, False)])
def test_pipeline_integrates_exactly_with_cfg(scale, steps, fused):
    codec = _codec()
    net = ConstantField(0.5, 0.2)
    pipe = OccForecastPipeline(codec, net, SamplerSettings(steps, 3.0, scale), fused_cfg=fused)
    out = pipe.forecast(_batch(), generator=torch.Generator().manual_seed(7))
    x0 = torch.randn((B, FUT, 2, X // 2, X // 2), generator=torch.Generator().manual_seed(7))
    v = 0.2 + scale * (0.5 - 0.2) if scale != 1.0 else 0.5
    assert torch.allclose(out.latents, x0 + v, atol=1e-5)
    # network calls: one per step (fused CFG: one batch of 2B), two per step for two-pass CFG
    assert out.nfe == steps and net.calls == steps * (1 if fused or scale == 1.0 else 2)
    assert out.classes.dtype == torch.uint8 and out.classes.shape == (B, FUT, X, X, Z)
    assert torch.equal(out.classes, codec.decode(out.latents))


def test_pipeline_equals_hand_written_guided_euler():
    """A trained-like forecaster (non-zero output layer): forecast() == an explicit Euler loop on the α = 3 grid
    with two separate cond/uncond calls per step, and fused == two-pass CFG."""
    codec, net, batch = _codec(), _net(), _batch()
    sampler = SamplerSettings(steps=4, shift=3.0, cfg_scale=2.0)
    out = OccForecastPipeline(codec, net, sampler).forecast(batch, generator=torch.Generator().manual_seed(5))
    two = OccForecastPipeline(codec, net, sampler, fused_cfg=False).forecast(
        batch, generator=torch.Generator().manual_seed(5))
    cond = ForecastCond(codec.encode(batch.past), batch.ego)
    x = torch.randn((B, FUT, 2, X // 2, X // 2), generator=torch.Generator().manual_seed(5))
    u = torch.linspace(0, 1, 5, dtype=torch.float64)
    grid = (u / (3.0 - 2.0 * u)).float()                                     # SD3 shift α = 3, t = 0 noise
    torch.testing.assert_close(grid, time_grid(4, 3.0))
    drop = torch.ones(B, dtype=torch.bool)
    with torch.no_grad():
        for k in range(4):
            t = grid[k].expand(B)
            v_c, v_u = net(x, t, cond), net(x, t, cond, drop_cond=drop)
            x = x + (grid[k + 1] - grid[k]) * (v_u + 2.0 * (v_c - v_u))
    torch.testing.assert_close(out.latents, x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(two.latents, x, rtol=1e-4, atol=1e-5)
    assert (out.latents - torch.randn_like(x)).abs().max() > 0.1            # not just the noise back


def test_noise_comes_from_the_generator_on_any_device():
    codec, batch = _codec(), _batch()
    pipe = OccForecastPipeline(codec, ConstantField(0.0, 0.0))
    cond = pipe.encode(batch)
    a = pipe.noise(cond, torch.Generator().manual_seed(11))
    b = torch.randn((B, FUT, 2, X // 2, X // 2), generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_flow_matching_objective_integration():
    codec = _codec()
    net = OccForecaster(latent_channels=2, past=P, future=FUT, base_channels=8, channel_mult=(1, 2),
                        num_res_blocks=1, attn_levels=(1,), heads=2)
    obj = FlowMatchingObjective(net, LatentPrepare(codec), cond_drop_prob=0.5)
    obj.train()
    assert not codec.vae.training                                   # frozen VAE stays in eval mode
    assert any(k.startswith("prepare.codec.vae.") for k in obj.state_dict())  # self-contained checkpoint
    n_trainable = sum(p.numel() for p in obj.param_groups()["main"])
    assert n_trainable == sum(p.numel() for p in net.parameters())
    out = obj(_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and net.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())


PRIOR_GRID = GridSpec((-8.0, -8.0, -1.0), (8.0, 8.0, 2.2), 0.4)           # 40 × 40 × 8


def _moving_batch() -> tuple[LatentCodec, OccBatch]:
    """A small codec and a 2-sample batch (random labels) whose ego drove 1.5 m per frame straight ahead."""
    torch.manual_seed(0)
    vae = OccVAE(grid_z=8, channels=(8, 8, 8), latent_channels=4, downsample=4, sparse=False).eval()
    g = torch.Generator().manual_seed(1)
    past = torch.randint(0, 18, (2, 4, *PRIOR_GRID.shape), generator=g)
    future = torch.randint(0, 18, (2, 6, *PRIOR_GRID.shape), generator=g)
    ego = torch.eye(4).repeat(2, 10, 1, 1)
    ego[:, :4, 0, 3] = torch.tensor([-4.5, -3.0, -1.5, 0.0])
    return LatentCodec(vae, scale=2.0), OccBatch(past=past, future=future, ego=ego, grid=PRIOR_GRID)


def test_condition_with_an_ego_motion_prior_encodes_the_warped_current_frame():
    """The prior latents are exactly the codec's encoding of the cv-warp baseline's forecast (one warp for
    the baseline and the network's prior), and a batch without a grid is refused with a clear message."""
    codec, batch = _moving_batch()
    past, ego, grid = batch.past, batch.ego, batch.grid
    cond = codec.condition(batch, "cv-warp")
    assert torch.equal(cond.prior_latents, codec.encode(cv_warp(past, ego, grid)))
    assert not torch.allclose(cond.prior_latents[:, 0], codec.encode(past[:, -1:])[:, 0])   # it moved
    assert codec.condition(batch).prior_latents is None
    with pytest.raises(ValueError, match="needs the batch's grid"):
        codec.condition(OccBatch(past=past, future=batch.future, ego=ego), "cv-warp")


class _ToZero(torch.nn.Module):
    """A residual net whose field carries any state to 0 in one Euler step from t = 0: v(x, 0) = −x."""

    prior, residual = "cv-warp", True

    def forward(self, x, t, cond, drop_cond=None):
        return -x


def test_residual_net_generates_the_difference_to_the_prior_and_the_pipeline_adds_it_back():
    codec, batch = _moving_batch()
    past, future, ego, grid = batch.past, batch.future, batch.ego, batch.grid
    x1, cond = LatentPrepare(codec, "cv-warp", residual=True)(batch)
    assert torch.allclose(x1, codec.encode(future) - codec.encode(cv_warp(past, ego, grid)), atol=1e-5)
    pipe = OccForecastPipeline(codec, _ToZero(), SamplerSettings(steps=1, shift=1.0, cfg_scale=1.0))
    out = pipe.sample(cond, pipe.noise(cond, torch.Generator().manual_seed(2)))
    assert torch.allclose(out, cond.prior_latents, atol=1e-6)           # residual 0 → the warp itself
    with pytest.raises(ValueError, match="needs an ego-motion prior"):
        LatentPrepare(codec, None, residual=True)
    with pytest.raises(ValueError, match="needs a prior"):
        OccForecaster(4, 4, 6, base_channels=8, channel_mult=(1,), attn_levels=(), heads=2, residual=True)
