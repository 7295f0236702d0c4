"""The released OccFM flow net (models/occfm_official/unet.py) and its forecaster adapter (adapter.py).

- goldens: our reduced-size net, with weights derived from key names, reproduces the upstream code's outputs
  (tests/goldens/occfm_flow_{hist,fut}_golden.npz, made by tools/occfm_reference.py from the reduced YAMLs beside
  them; the upstream code is not needed here);
- the full-size nets (built on the meta device) have exactly the released checkpoint's keys, shapes and dtypes;
- the fixed tables (position, frame, time, trajectory features, T5 buckets) against hand-computed entries;
- the adapter: input layout, t ×1000, CFG drop of the latents only, which trajectory rows each variant reads,
  errors, snapshot rebuild, backward and bf16 autocast.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from occ_mfd.builder import build
from occ_mfd.flow.guidance import guided
from occ_mfd.models.forecaster import ForecastCond
from occ_mfd.models.occfm_official.adapter import OccFmForecaster
from occ_mfd.models.occfm_official.key_init import fill_from_keys
from occ_mfd.models.occfm_official.unet import (OccFmFlowNet, T5RelativePositionBias, frame_table, spatial_pos_table,
                                                t5_relative_buckets, timestep_features, trajectory_features)
from occ_mfd.models.occfm_official.upstream_config import flow_section, load_upstream_yaml
from occ_mfd.models.snapshot import network_spec

GOLDENS = Path(__file__).resolve().parent / "goldens"
VARIANTS = {"hist": 6, "fut": 12}                                  # trajectory_length
#: The released flow net (upstream tools/cfgs/transition_configs/cfm.yaml; PORT.md §1.2), hist variant.
RELEASED = dict(name="FLOW_MATCHING_DOWN_X4_DiT", in_channels=16, out_channels=16, model_channels=128,
                channel_multi=[2, 4], input_size=[50, 50], trajectory_length=6, init_kernel_size=7,
                init_3d_conv_channels=64, attn_dim=32, temporal_attn_head=8, spatial_attn_head=8)
PARAMS = {"hist": 11_830_416, "fut": 11_854_992}
PREFIX = "transition_model."


def _reduced_kwargs(variant: str) -> dict:
    return flow_section(load_upstream_yaml(GOLDENS / f"occfm_flow_{variant}_reduced.yaml"))


def _reduced_net(variant: str) -> OccFmFlowNet:
    return fill_from_keys(OccFmFlowNet(**_reduced_kwargs(variant))).eval()


# ------------------------------------------------------------------------------------------ goldens
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reduced_net_matches_upstream_goldens(variant):
    g = np.load(GOLDENS / f"occfm_flow_{variant}_golden.npz")
    # The golden batch covers t = 0 and 731.5, each with the condition frames present and zeroed (CFG's input).
    assert sorted(set(g["t"].tolist())) == [0.0, 731.5]
    cond_zero = np.abs(g["x"][:, :6]).reshape(len(g["x"]), -1).max(1) == 0
    assert cond_zero.any() and not cond_zero.all()
    net = _reduced_net(variant)
    assert net.trajectory_length == VARIANTS[variant]
    with torch.no_grad():
        v = net(torch.from_numpy(g["x"]), torch.from_numpy(g["t"]), torch.from_numpy(g["traj"])).numpy()
    assert v.shape == g["v"].shape
    err = np.abs(v - g["v"]).max()
    assert err <= 1e-5, f"{variant}: max |ours − upstream| = {err:.3g} (|v| up to {np.abs(g['v']).max():.3g})"


def test_from_upstream_config_reads_the_yaml():
    net = OccFmFlowNet.from_upstream_config(load_upstream_yaml(GOLDENS / "occfm_flow_fut_reduced.yaml"))
    assert net.init_kwargs["trajectory_length"] == 12 and net.init_kwargs["input_size"] == [10, 10]
    json.dumps(net.init_kwargs)                                    # JSON-able: snapshots store it
    assert OccFmFlowNet(**net.init_kwargs).init_kwargs == net.init_kwargs


# ------------------------------------------------------------------------------------------ released layout
def _manifest() -> dict[str, tuple[tuple[int, ...], str, bool]]:
    """``transition_model.`` rows of the key manifest, prefix stripped: key → (shape, dtype, trainable)."""
    rows = {}
    for line in (GOLDENS / "occfm_state_dict_keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.startswith(PREFIX):
            continue
        key, shape, dtype, kind, trainable = line.split("\t")
        assert kind == "param"
        rows[key[len(PREFIX):]] = (tuple(int(s) for s in shape.split("x")), dtype, trainable == "yes")
    return rows


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_size_net_has_the_released_keys_shapes_and_dtypes(variant):
    expected = _manifest()
    assert len(expected) == 204
    if variant == "fut":        # the only difference: 12 trajectory rows × 8 frequencies × 4 features in
        expected["traj_encoder.0.weight"] = ((128, 384), "float32", True)
    with torch.device("meta"):
        net = OccFmFlowNet(**{**RELEASED, "trajectory_length": VARIANTS[variant]})
    sd = net.state_dict()
    assert sorted(sd) == sorted(expected), (sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd)))
    assert list(sd) == list(expected)                              # even in the checkpoint's order
    assert set(dict(net.named_parameters())) == set(sd)          # all Parameters, no buffers (as upstream)
    params = dict(net.named_parameters())
    for key, (shape, dtype, trainable) in expected.items():
        assert tuple(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == f"torch.{dtype}", key
        assert params[key].requires_grad == trainable, key       # pos_embed / temp_embed are frozen
    assert sum(p.numel() for p in net.parameters()) == PARAMS[variant]


def test_constructor_refuses_inconsistent_sizes():
    with pytest.raises(ValueError, match="model_channels"):
        OccFmFlowNet(**{**RELEASED, "model_channels": 64})
    with pytest.raises(ValueError, match="square"):
        OccFmFlowNet(**{**RELEASED, "input_size": [50, 40]})
    with pytest.raises(ValueError, match="halve"):
        OccFmFlowNet(**{**RELEASED, "input_size": [25, 25]})


# ------------------------------------------------------------------------------------------ fixed tables
def test_spatial_position_table_comes_from_a_grid_one_wider():
    pos = spatial_pos_table(50, 50, 128)                          # channels: sin col | cos col | sin row | cos row
    assert pos.shape == (2500, 128) and pos.dtype == torch.float32
    w1 = 10000 ** (-1 / 32)                                       # second frequency of a 64-wide half
    # Token 50 (row 1, col 0 of the latent) is cell (col 50, row 0) of the 51-wide grid.
    expect = {(50, 0): math.sin(50), (50, 32): math.cos(50), (50, 64): 0.0, (50, 96): 1.0,
              (51, 0): 0.0, (51, 32): 1.0, (51, 64): math.sin(1), (51, 96): math.cos(1),
              (2499, 1): 0.0, (2499, 65): math.sin(49 * w1), (2499, 97): math.cos(49 * w1),
              (7, 1): math.sin(7 * w1), (7, 33): math.cos(7 * w1), (7, 64): 0.0}
    for (k, c), val in expect.items():
        assert pos[k, c].item() == pytest.approx(val, abs=1e-6), (k, c)
    # The net's frozen table is this one (reduced size: a 10×10 latent reads an 11-wide grid).
    net = OccFmFlowNet(**_reduced_kwargs("hist"))
    assert torch.equal(net.pos_embed[0], spatial_pos_table(10, 10, 32))
    assert net.pos_embed[0, 10, 0].item() == pytest.approx(math.sin(10), abs=1e-6)
    assert not net.pos_embed.requires_grad


def test_frame_table():
    temp = frame_table(12, 128)
    assert temp.shape == (12, 128)
    for (f, c), val in {(5, 0): math.sin(5), (5, 64): math.cos(5), (3, 1): math.sin(3 * 10000 ** (-1 / 64)),
                        (0, 10): 0.0, (0, 70): 1.0, (11, 127): math.cos(11 * 10000 ** (-63 / 64))}.items():
        assert temp[f, c].item() == pytest.approx(val, abs=1e-6), (f, c)
    assert torch.equal(OccFmFlowNet(**_reduced_kwargs("hist")).temp_embed[0], frame_table(12, 32))


def test_time_embedding_is_cos_then_sin():
    t = torch.tensor([731.5, 0.0])
    e = timestep_features(t, 128)
    f1 = math.exp(-math.log(10000) / 64)
    assert e.shape == (2, 128)
    for (b, c), val in {(0, 0): math.cos(731.5), (0, 64): math.sin(731.5), (0, 1): math.cos(731.5 * f1),
                        (0, 65): math.sin(731.5 * f1), (1, 0): 1.0, (1, 64): 0.0}.items():
        assert e[b, c].item() == pytest.approx(val, abs=1e-4), (b, c)
    odd = timestep_features(t, 5)
    assert odd.shape == (2, 5) and torch.all(odd[:, 4] == 0)


def test_trajectory_features_layout():
    traj = torch.tensor([[[0.5, 2.0], [-1.25, 3.0]]])             # (B=1, n=2, xy) metres
    feats = trajectory_features(traj, 8)
    assert feats.shape == (1, 2 * 8 * 4)                          # no raw (dx, dy)
    f1 = 100 ** (1 / 8)
    # Frame-major; per frequency [sin x, sin y, cos x, cos y]; raw metres.
    expect = {0: math.sin(0.5), 1: math.sin(2.0), 2: math.cos(0.5), 3: math.cos(2.0), 4: math.sin(0.5 * f1),
              5: math.sin(2.0 * f1), 7: math.cos(2.0 * f1), 28: math.sin(0.5 * 100 ** (7 / 8)),
              32: math.sin(-1.25), 35: math.cos(3.0), 38: math.cos(-1.25 * f1)}
    for c, val in expect.items():
        assert feats[0, c].item() == pytest.approx(val, abs=1e-5), c


def test_t5_buckets_and_bias():
    b = t5_relative_buckets(12)                                   # 32 buckets, max distance 16
    assert b.shape == (12, 12) and torch.all(b.diagonal() == 0)
    assert b[5, 2] == 3 and b[2, 5] == 16 + 3                     # keys after the query use the upper half
    assert b[11, 0] == 11 and b[0, 11] == 27
    far = t5_relative_buckets(40)
    # Below 8 exact; 8..15: 8 + ⌊8·log2(d/8)⌋ (= d here); from 16 on: the last bucket of the half.
    assert [far[d, 0].item() for d in (7, 8, 9, 12, 15, 16, 39)] == [7, 8, 9, 12, 15, 15, 15]
    assert far[0, 20] == 31
    mod = T5RelativePositionBias(heads=3)
    with torch.no_grad():
        mod.relative_attention_bias.weight.copy_(torch.arange(96.0).reshape(32, 3))
    bias = mod(12)
    assert bias.shape == (3, 12, 12)
    assert bias[2, 2, 5].item() == 19 * 3 + 2 and bias[0, 11, 0].item() == 11 * 3


# ------------------------------------------------------------------------------------------ adapter
P, F = 4, 6


def _adapter(variant: str) -> OccFmForecaster:
    return OccFmForecaster(_reduced_net(variant)).eval()


def _inputs(B=2, seed=0, C=4, S=10):
    g = torch.Generator().manual_seed(seed)
    traj = torch.stack([torch.randn(B, P + F, generator=g) * 0.3, torch.rand(B, P + F, generator=g) * 7], dim=-1)
    cond = ForecastCond(past_latents=torch.randn(B, P, C, S, S, generator=g),
                        ego=torch.eye(4).repeat(B, P + F, 1, 1), lidar_traj=traj)
    return torch.randn(B, F, C, S, S, generator=g), torch.tensor([0.2, 0.7315])[:B], cond


def _direct(net: OccFmFlowNet, x_t, past, t_net, traj_rows):
    """The upstream-layout call the adapter should make: [0, 0, past, x_t], t as given, [0, 0, rows]."""
    B = x_t.shape[0]
    x = torch.cat([torch.zeros_like(x_t[:, :2]), past, x_t], dim=1)
    traj = torch.cat([torch.zeros(B, 2, 2), traj_rows], dim=1)
    return net(x, t_net, traj)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_is_the_last_frames_of_the_upstream_layout_call(variant):
    model = _adapter(variant)
    rows = VARIANTS[variant] - 2
    assert model.traj_rows == rows == {"hist": P, "fut": P + F}[variant]
    x_t, t, cond = _inputs()
    with torch.no_grad():
        v = model(x_t, t, cond)
        full = _direct(model.net, x_t, cond.past_latents, t * 1000, cond.lidar_traj[:, :rows])
        unscaled = _direct(model.net, x_t, cond.past_latents, t, cond.lidar_traj[:, :rows])
    assert v.shape == x_t.shape
    torch.testing.assert_close(v, full[:, -F:], rtol=0, atol=1e-6)
    assert (v - unscaled[:, -F:]).abs().max() > 1e-2              # t is passed ×1000


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_drop_cond_zeroes_the_latents_and_keeps_the_trajectory(variant):
    model = _adapter(variant)
    rows = VARIANTS[variant] - 2
    x_t, t, cond = _inputs()
    drop = torch.tensor([True, False])
    with torch.no_grad():
        v = model(x_t, t, cond, drop_cond=drop)
        no_latents = _direct(model.net, x_t, torch.zeros_like(cond.past_latents), t * 1000,
                             cond.lidar_traj[:, :rows])[:, -F:]
        no_latents_no_traj = _direct(model.net, x_t, torch.zeros_like(cond.past_latents), t * 1000,
                                     torch.zeros_like(cond.lidar_traj[:, :rows]))[:, -F:]
        kept = model(x_t, t, cond)
    torch.testing.assert_close(v[0], no_latents[0], rtol=0, atol=1e-6)
    assert (v[0] - no_latents_no_traj[0]).abs().max() > 1e-2     # the trajectory still conditions it
    torch.testing.assert_close(v[1], kept[1], rtol=0, atol=1e-6)  # a kept sample is untouched
    assert (v[0] - kept[0]).abs().max() > 1e-2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trajectory_rows_read(variant):
    """hist reads rows [:4] of lidar_traj (row 3: the current frame's step to the first future frame), fut [:10]."""
    model = _adapter(variant)
    x_t, t, cond = _inputs()
    last_used = {"hist": P - 1, "fut": P + F - 1}[variant]

    def with_row(r):
        traj = cond.lidar_traj.clone()
        traj[:, r] += torch.tensor([0.7, -1.3])
        return ForecastCond(cond.past_latents, cond.ego, lidar_traj=traj)

    with torch.no_grad():
        base = model(x_t, t, cond)
        assert (model(x_t, t, with_row(last_used)) - base).abs().max() > 1e-3
        assert (model(x_t, t, with_row(0)) - base).abs().max() > 1e-3
        if last_used + 1 < P + F:                                 # hist: the future rows are not read
            torch.testing.assert_close(model(x_t, t, with_row(last_used + 1)), base, rtol=0, atol=0)
            torch.testing.assert_close(model(x_t, t, with_row(P + F - 1)), base, rtol=0, atol=0)


def test_adapter_errors():
    model = _adapter("hist")
    x_t, t, cond = _inputs()
    with pytest.raises(ValueError, match="lidar_traj"):
        model(x_t, t, ForecastCond(cond.past_latents, cond.ego))
    with pytest.raises(ValueError, match="lidar_traj"):
        model(x_t, t, ForecastCond(cond.past_latents, cond.ego, lidar_traj=cond.lidar_traj[:, :6]))
    with pytest.raises(ValueError, match="past_latents"):
        model(x_t, t, ForecastCond(cond.past_latents[:, 1:], cond.ego, lidar_traj=cond.lidar_traj))
    with pytest.raises(ValueError, match="x_t"):
        model(x_t[:, :5], t, cond)
    for past, future in ((3, 6), (4, 5)):
        with pytest.raises(ValueError, match="past=.*future="):
            OccFmForecaster(_reduced_kwargs("hist"), past=past, future=future)
    with pytest.raises(ValueError, match="trajectory_length"):
        OccFmForecaster({**_reduced_kwargs("hist"), "trajectory_length": 14})


def test_adapter_contract_attributes_and_snapshot_rebuild():
    model = _adapter("fut")
    assert (model.past, model.future, model.latent_channels) == (4, 6, 4)
    assert model.prior is None and model.residual is False and model.prediction == "velocity"
    spec = network_spec(model)
    json.dumps(spec)
    rebuilt = build({"type": spec["class"], **spec["kwargs"]})
    rebuilt.load_state_dict(model.state_dict())                   # strict: same keys
    assert isinstance(rebuilt, OccFmForecaster) and rebuilt.net.trajectory_length == 12
    x_t, t, cond = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x_t, t, cond), model(x_t, t, cond), rtol=0, atol=0)
    assert set(model.state_dict()) == {f"net.{k}" for k in model.net.state_dict()}


def test_fused_cfg_through_the_adapter():
    """The pipeline's fused CFG batch (conditional ‖ dropped) gives v_u + s·(v_c − v_u) of separate calls."""
    model = _adapter("hist")
    x_t, t, cond = _inputs()
    with torch.no_grad():
        v = guided(model, 2.0)(x_t, t, cond)
        v_c, v_u = model(x_t, t, cond), model(x_t, t, cond, drop_cond=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(v, v_u + 2.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)


def test_backward_and_bf16_autocast():
    model = _adapter("hist").train()
    x_t, t, cond = _inputs()
    model(x_t, t, cond, drop_cond=torch.tensor([False, True])).square().mean().backward()
    for name in ("net.t_embedder.0.weight", "net.traj_encoder.0.weight", "net.time_rel_pos_bias.relative_attention_bias.weight",
                 "net.downs.0.2.attn.qkv.weight", "net.mid_spatial_attn.fn.fn.fn.to_qkv.weight",
                 "net.init_temporal_attn.fn.norm.gamma", "net.final_conv.1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    assert model.net.pos_embed.grad is None                       # frozen table
    model.eval()
    with torch.no_grad():
        ref = model(x_t, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x_t, t, cond)
    assert torch.isfinite(low).all()
    # bf16 keeps ~3 significant digits; a broken path (wrong dtype mixing, overflow) would be far off.
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()
