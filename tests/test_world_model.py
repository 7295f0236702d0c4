"""LatentCodec / make_prepare / OccForecastPipeline glue, with closed-form velocity fields."""
import pytest
import torch

from occ_mfd.data.records import OccBatch
from occ_mfd.models.forecaster import ForecastCond, OccForecaster
from occ_mfd.models.vae import OccVAE
from occ_mfd.models.world_model import LatentCodec, OccForecastPipeline, make_prepare

B, P, FUT, X, Z = 2, 2, 3, 8, 4


def _codec(scale=10.0):
    torch.manual_seed(0)
    return LatentCodec(OccVAE(grid_z=Z, channels=(8, 16), latent_channels=2, downsample=2), scale=scale)


def _batch(cached=False):
    g = torch.Generator().manual_seed(0)
    b = OccBatch(past=torch.randint(0, 18, (B, P, X, X, Z), generator=g),
                 future=torch.randint(0, 18, (B, FUT, X, X, Z), generator=g),
                 ego=torch.eye(4).repeat(B, P + FUT, 1, 1))
    if cached:
        b.latents_past = torch.randn(B, P, 2, X // 2, X // 2, generator=g)
        b.latents_future = torch.randn(B, FUT, 2, X // 2, X // 2, generator=g)
    return b


def test_codec_scales_and_decodes_argmax():
    codec = _codec(scale=10.0)
    batch = _batch()
    lat = codec.encode(batch.past)                                            # (B, P, C, H, W)
    ref = codec.vae.encode(batch.past[:, 0]).mean
    assert torch.allclose(lat[:, 0], 10.0 * ref, atol=1e-6)
    ids = codec.decode(lat)
    assert torch.equal(ids[:, 1], codec.vae.decode(lat[:, 1] / 10.0).argmax(1))
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.vae.training


def test_prepare_uses_cached_latents_scaled():
    codec = _codec(scale=10.0)
    prepare = make_prepare(codec)
    batch = _batch(cached=True)
    x1, cond = prepare(batch)
    assert torch.equal(x1, 10.0 * batch.latents_future) and torch.equal(cond.past_latents, 10.0 * batch.latents_past)
    x1b, condb = make_prepare(codec)(_batch(cached=False))
    assert torch.allclose(x1b, codec.encode(batch.future)) and condb.ego.shape == (B, P + FUT, 4, 4)


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


@pytest.mark.parametrize("scale,steps", [(1.0, 1), (2.0, 4)])
def test_pipeline_integrates_exactly_with_cfg(scale, steps):
    codec = _codec()
    net = ConstantField(0.5, 0.2)
    pipe = OccForecastPipeline(codec, net, steps=steps, shift=3.0, cfg_scale=scale)
    out = pipe.forecast(_batch(), generator=torch.Generator().manual_seed(7))
    x0 = torch.randn((B, FUT, 2, X // 2, X // 2), generator=torch.Generator().manual_seed(7))
    v = 0.2 + scale * (0.5 - 0.2) if scale != 1.0 else 0.5
    assert torch.allclose(out.latents, x0 + v, atol=1e-5)
    assert out.nfe == steps == net.calls
    assert out.classes.dtype == torch.uint8 and out.classes.shape == (B, FUT, X, X, Z)
    assert torch.equal(out.classes, codec.decode(out.latents).to(torch.uint8))
    assert set(out.timings_ms) == {"encode", "sample", "decode"}


def test_pipeline_runs_real_forecaster():
    codec = _codec()
    net = OccForecaster(latent_channels=2, past=P, future=FUT, base_channels=8, channel_mult=(1, 2),
                        num_res_blocks=1, attn_levels=(1,), heads=2).eval()
    out = OccForecastPipeline(codec, net, steps=2).forecast(_batch(), generator=torch.Generator().manual_seed(0))
    # zero-initialised output layer → v = 0 → the latents stay the initial noise
    x0 = torch.randn((B, FUT, 2, X // 2, X // 2), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.latents, x0)


def test_flow_matching_objective_integration():
    from occ_mfd.flow.fm_objective import FlowMatchingObjective

    codec = _codec()
    net = OccForecaster(latent_channels=2, past=P, future=FUT, base_channels=8, channel_mult=(1, 2),
                        num_res_blocks=1, attn_levels=(1,), heads=2)
    obj = FlowMatchingObjective(net, make_prepare(codec), cond_drop_prob=0.5)
    obj.train()
    assert not codec.vae.training                                   # frozen VAE stays in eval mode
    assert any(k.startswith("prepare.codec.vae.") for k in obj.state_dict())  # self-contained checkpoint
    n_trainable = sum(p.numel() for p in obj.param_groups()["main"])
    assert n_trainable == sum(p.numel() for p in net.parameters())
    out = obj(_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss) and net.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())


def test_load_vae_from_engine_checkpoint(tmp_path):
    from occ_mfd.engine.checkpoint import save_checkpoint
    from occ_mfd.models.vae_objective import VAEObjective
    from occ_mfd.models.world_model import load_vae_from_checkpoint

    cfg = ("objective = dict(type='occ_mfd.models.vae_objective.VAEObjective', vae=dict("
           "type='occ_mfd.models.vae.OccVAE', grid_z=4, channels=(8, 16), latent_channels=2, downsample=2))\n")
    torch.manual_seed(3)
    obj = VAEObjective(OccVAE(grid_z=4, channels=(8, 16), latent_channels=2, downsample=2))
    ema = {k: v + 1.0 for k, v in obj.vae.state_dict().items()}      # distinguishable EMA weights
    path = save_checkpoint({"step": 5, "objective": obj.state_dict(), "ema": {"shadow": {"vae": ema}},
                            "config": cfg}, tmp_path)
    vae = load_vae_from_checkpoint(path)
    assert torch.equal(vae.class_embed.weight, ema["class_embed.weight"])
    vae_live = load_vae_from_checkpoint(path, use_ema=False)
    assert torch.equal(vae_live.class_embed.weight, obj.vae.class_embed.weight)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
