"""The released OccFM VAE port (occ_mfd.models.occfm_official.{swin_v2,vae}).

- golden: our reduced VAE with key-derived weights reproduces the upstream code's outputs, stored in
  tests/goldens/occfm_vae_golden.npz by tools/occfm_reference.py from tests/goldens/occfm_vae_reduced.yaml;
- manifest: at full size (built on the meta device) the state_dict has exactly the released checkpoints' VAE keys,
  shapes and dtypes (tests/goldens/occfm_state_dict_keys.tsv) and 18,537,456 parameters;
- fixed tables (height embedding, Swin-V2 coordinate table, index, shift mask) against hand-computed values;
- stored buffers are used as stored (the released EMA copies may hold drifted relative_position_index values);
- clear errors on wrong inputs and unsupported configs.
No upstream code is needed: the goldens and the manifest are committed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from occ_mfd.models.occfm_official.key_init import fill_from_keys
from occ_mfd.models.occfm_official.swin_v2 import (
    SwinV2Block,
    WindowAttentionV2,
    relative_coords_table,
    relative_position_index,
    shifted_window_mask,
)
from occ_mfd.models.occfm_official.upstream_config import load_upstream_yaml
from occ_mfd.models.occfm_official.vae import OccFmVAE
from occ_mfd.models.vae import LatentDist

GOLDENS = Path(__file__).resolve().parent / "goldens"
VAE_PARAMS = 18_537_456

# compressor_configs/vae_swin_x16_h16.yaml of the release (values as published), and the VAE run config that
# includes it the upstream way (``_BASE_CONFIG_`` relative to the checkout root).
FULL_COMPRESSOR_YAML = """\
MODEL:
  NAME: VaeSwinX16
  EMBEDDING:
    NAME: VoxelHeightSemEmbed
    NUM_CATE: 18
    FEAT_DIM: 8
    HEIGHT_NUM: 16
    OCC_RANGE: [-40, -40, -1, 40, 40, 5.4]
    VOXEL_SIZE: [0.4, 0.4, 0.4]
    ENCODER_DIM: 128
  ENCODER:
    NAME: SwinSingleFrameDownV2
    PATCH_EMBED_DIM: 128
    IMG_SIZE: 200
    PATCH_SIZE: 1
    INPUT_CHANNEL: 128
    DEPTH: [2, 6]
    MLP_RATIO: 4
    QKV_BIAS: True
    OUT_DIM: 256
    USE_CHECKPOINTS: False
    LATENT_DIM: 16
    DOWNSAMPLE: ['conv', 'conv']
  QUANTIZATION:
    NAME: VaeQuant
  DECODER:
    NAME: SwinSingleFrameUpV2
    INPUT_CHANNEL: 16
    DEPTH: [6, 2]
    PATCH_EMBED_DIM: 128
    OUT_DIM: 128
    MLP_RATIO: 4
    QKV_BIAS: True
    USE_CHECKPOINTS: False
    UPSAMPLE: ['interp', 'interp']
"""
FULL_VAE_YAML = """\
NAME: OccFmVAE
COMPRESSOR_CONFIG:
    _BASE_CONFIG_: tools/cfgs/compressor_configs/vae_swin_x16_h16.yaml
"""


def reduced_vae() -> OccFmVAE:
    cfg = load_upstream_yaml(GOLDENS / "occfm_vae_reduced.yaml")
    return fill_from_keys(OccFmVAE.from_upstream_config(cfg)).eval()


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDENS / "occfm_vae_golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def full_cfg_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("occfm_cfgs")
    (root / "tools/cfgs/compressor_configs").mkdir(parents=True)
    (root / "tools/cfgs/compressor_configs/vae_swin_x16_h16.yaml").write_text(FULL_COMPRESSOR_YAML)
    (root / "tools/cfgs/occfm_vae.yaml").write_text(FULL_VAE_YAML)
    return root / "tools/cfgs/occfm_vae.yaml"


def manifest_vae_rows() -> list[tuple[str, str, str, str, str]]:
    rows = []
    for line in (GOLDENS / "occfm_state_dict_keys.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype, kind, trainable = line.split("\t")
        if not key.startswith("transition_model."):
            rows.append((key, shape, dtype, kind, trainable))
    return rows


# ------------------------------------------------------------------------------------------------ golden
def test_reduced_vae_matches_upstream_golden(golden):
    vae = reduced_vae()
    occ = torch.from_numpy(golden["occ"])
    assert occ.shape == (2, 8, 8, 16) and golden["logits"].std() > 0.1  # a real signal, not zeros
    with torch.no_grad():
        dist = vae.encode(occ)
        logits = vae.decode(torch.from_numpy(golden["mu"]))            # decoded from upstream's μ
    for name, ours in (("mu", dist.mean), ("logvar", dist.logvar), ("logits", logits)):
        ref = torch.from_numpy(golden[name])
        assert ours.shape == ref.shape, name
        err = (ours - ref).abs().max().item()
        assert err <= 1e-5, f"{name}: max |ours - upstream| = {err:.2e}"


def test_forward_matches_encode_then_decode(golden):
    vae = reduced_vae()
    occ = torch.from_numpy(golden["occ"])
    with torch.no_grad():
        logits, dist = vae(occ, sample=False)
        assert isinstance(dist, LatentDist) and logits.shape == (2, 18, 8, 8, 16)
        assert torch.equal(logits, vae.decode(dist.mean))
        # no clamp on log σ²: a posterior far outside OccVAE's [-30, 20] clamp comes out as computed
        vae.encoder.conv_out.bias.data[16:] += 50.0
        assert vae.encode(occ).logvar.min() > 20.0
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a, _ = vae(occ, sample=True, generator=g1)
        b, _ = vae(occ, sample=True, generator=g2)
        assert torch.equal(a, b)
    assert (vae.num_classes, vae.grid_z, vae.class_dim, vae.latent_channels, vae.downsample, vae.free_id) == (
        18, 16, 8, 16, 4, 17)


def test_logits_are_dot_products_with_detached_class_embeddings():
    vae = reduced_vae()
    z = torch.randn(1, 16, 2, 2, generator=torch.Generator().manual_seed(0))
    logits = vae.decode(z)                                                       # (1, 18, 8, 8, 16)
    feats = vae.decode_features(z)                                               # (1, 16, 8, 8, 8)
    w = vae.embedding.class_embeds.weight
    x, y, zz, k = 5, 2, 11, 13
    assert torch.allclose(logits[0, k, x, y, zz], feats[0, zz, :, x, y] @ w[k], atol=1e-5)
    logits.sum().backward()
    assert w.grad is None                       # upstream detaches the class embeddings on the decoder side


# ------------------------------------------------------------------------------------------------ manifest
def test_full_size_keys_shapes_dtypes_match_release_manifest(full_cfg_path):
    with torch.device("meta"):
        vae = OccFmVAE.from_upstream_config(load_upstream_yaml(full_cfg_path))
    params = dict(vae.named_parameters())
    ours = []
    for key, t in vae.state_dict(keep_vars=True).items():
        kind = "param" if key in params else "buffer"
        trainable = ("yes" if t.requires_grad else "no") if kind == "param" else "-"
        ours.append((key, "x".join(map(str, t.shape)), str(t.dtype).removeprefix("torch."), kind, trainable))
    expected = manifest_vae_rows()
    assert len(expected) == 403
    missing = {r[0] for r in expected} - {r[0] for r in ours}
    extra = {r[0] for r in ours} - {r[0] for r in expected}
    assert not missing and not extra, f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
    assert ours == expected   # shapes, dtypes, kinds, frozen-ness; also upstream's key order
    assert sum(p.numel() for p in vae.parameters()) == VAE_PARAMS
    # rebuildable from init_kwargs through JSON (inference snapshots store them)
    kwargs = json.loads(json.dumps(vae.init_kwargs))
    with torch.device("meta"):
        again = OccFmVAE(**kwargs)
    assert [(k, t.shape) for k, t in again.state_dict().items()] == [(k, t.shape) for k, t in vae.state_dict().items()]


# ------------------------------------------------------------------------------------------------ fixed tables
def test_height_embedding_closed_form():
    emb = reduced_vae().embedding.height_embedding                 # key-derived fill leaves it alone
    assert emb.shape == (16, 4) and not emb.requires_grad
    # h = (0.4 z + 0.2) / 6.4; row = [sin 0, cos 0, sin πh, cos πh]
    s, c = math.sin(math.pi / 32), math.cos(math.pi / 32)           # 0.0980171, 0.9951847
    expected = {0: [0, 1, s, c], 7: [0, 1, c, s], 15: [0, 1, s, -c]}  # h = 1/32, 15/32, 31/32
    for z, row in expected.items():
        assert emb[z].tolist() == pytest.approx(row, abs=1e-7)
    h = (0.4 * torch.arange(16, dtype=torch.float64) + 0.2) / 6.4
    assert torch.equal(emb[:, 2], torch.sin(math.pi * h).float())


def test_relative_coords_table_window5():
    t = relative_coords_table(5)
    assert t.shape == (1, 9, 9, 2) and t.dtype == torch.float32
    f = {d: math.copysign(math.log2(1 + 2 * abs(d)) / 3, d) if d else 0.0 for d in range(-4, 5)}  # 8|d|/4 = 2|d|
    assert f[1] == pytest.approx(0.5283208) and f[4] == pytest.approx(1.0566417)
    assert t[0, 0, 0].tolist() == pytest.approx([f[-4], f[-4]], abs=1e-6)
    assert t[0, 4, 5].tolist() == pytest.approx([0.0, f[1]], abs=1e-6)
    assert t[0, 6, 1].tolist() == pytest.approx([f[2], f[-3]], abs=1e-6)   # (Δrow, Δcol) = (2, -3)


def test_relative_position_index_window5():
    idx = relative_position_index(5)
    assert idx.shape == (25, 25) and idx.dtype == torch.int64
    # token t = (row t // 5, col t % 5); index = (Δrow + 4)·9 + (Δcol + 4)
    assert idx[0, 0] == 40 and idx[0, 24] == 0 and idx[24, 0] == 80
    assert idx[7, 13] == 30                                            # (1,2) vs (2,3): 3·9 + 3
    assert torch.equal(idx.diagonal(), torch.full((25,), 40))
    assert torch.equal(idx + idx.T, torch.full((25, 25), 80))
    assert set(idx.unique().tolist()) == set(range(81))


def test_shifted_window_mask_full_size_encoder():
    m = shifted_window_mask(200, 200, 5, 2)                            # encoder stage 0, odd blocks
    assert m.shape == (1600, 25, 25) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {-100.0, 0.0}
    # windows fully inside the map (39×39 of them) are unmasked; the last window row/column mixes the wrapped
    # 2-wide border with 3 rows/cols of the other side: per edge window 625 - (15² + 10²) = 300 masked pairs,
    # in the corner window 625 - (9² + 6² + 6² + 4²) = 456.
    assert (m != 0).sum() == 78 * 300 + 456
    assert m[0].abs().sum() == 0
    corner = m[1599]                    # tokens (r, c), region by (r >= 3, c >= 3)
    assert corner[0, 24] == -100 and corner[0, 1] == 0 and corner[0, 3] == -100 and corner[18, 24] == 0
    edge = m[39]                        # top window row, last column: only the columns split
    assert edge[0, 3] == -100 and edge[0, 5] == 0 and edge[0, 20] == 0
    # the block's buffer is this mask; unshifted blocks hold none
    blk = SwinV2Block(8, (20, 20), num_heads=2, window=5, shift=2)
    assert torch.equal(blk.attn_mask, shifted_window_mask(20, 20, 5, 2))
    assert "attn_mask" not in SwinV2Block(8, (20, 20), num_heads=2, window=5, shift=0).state_dict()
    # Swin's rule: a map no larger than a window is one unshifted window
    small = SwinV2Block(8, (4, 4), num_heads=2, window=5, shift=2)
    assert (small.window, small.shift) == (4, 0) and small.attn.relative_position_index.shape == (16, 16)


@pytest.mark.parametrize("log_scale, scale", [(math.log(10.0), 10.0), (10.0, 100.0)])  # exp(10) is clamped to 100
def test_window_attention_against_definition(log_scale, scale):
    attn = fill_from_keys(WindowAttentionV2(dim=8, window=2, num_heads=2))
    with torch.no_grad():
        attn.logit_scale.fill_(log_scale)
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))   # 3 windows of 2×2 tokens
    with torch.no_grad():
        out = attn(x)
        w = attn.qkv.weight
        q = x @ w[:8].T + attn.q_bias
        k = x @ w[8:16].T                                                   # no key bias
        v = x @ w[16:].T + attn.v_bias
        f = {-1: -math.log2(9) / 3, 0: 0.0, 1: math.log2(9) / 3}            # window 2: 8|d|/(2-1) = 8|d|
        rc = [(t // 2, t % 2) for t in range(4)]
        ref = torch.zeros(3, 4, 8)
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            qn, kn = torch.nn.functional.normalize(q[..., sl], dim=-1), torch.nn.functional.normalize(k[..., sl], dim=-1)
            logits = qn @ kn.transpose(1, 2) * scale                         # (3, 4, 4)
            for i in range(4):
                for j in range(4):
                    coord = torch.tensor([f[rc[i][0] - rc[j][0]], f[rc[i][1] - rc[j][1]]])
                    logits[:, i, j] += 16 * torch.sigmoid(attn.cpb_mlp(coord)[h])
            ref[..., sl] = logits.softmax(-1) @ v[..., sl]
        ref = attn.proj(ref)
    assert torch.allclose(out, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------ stored buffers
def test_stored_buffers_are_used_as_stored(golden):
    """Drifted relative_position_index values (as an EMA update truncates them) must change the outputs."""
    vae = reduced_vae()
    occ = torch.from_numpy(golden["occ"])
    mu = torch.from_numpy(golden["mu"])
    key_enc = "encoder.net_blocks.0.blocks.1.attn.relative_position_index"
    key_dec = "decoder.net_blocks.2.blocks.1.attn.relative_position_index"
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for key in (key_enc, key_dec):
        idx = state[key]
        drop = (torch.rand(idx.shape, generator=g) < 0.15) & (idx > 0)   # ~15 % one lower, as PORT.md §2
        state[key] = idx - drop.long()
    drifted = reduced_vae()
    drifted.load_state_dict(state)
    assert torch.equal(drifted.state_dict()[key_enc], state[key_enc])   # loaded, not recomputed
    with torch.no_grad():
        base_mu, base_logits = vae.encode(occ).mean, vae.decode(mu)
        new_mu, new_logits = drifted.encode(occ).mean, drifted.decode(mu)
        attn = drifted.encoder.net_blocks[0].blocks[1].attn
        table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
        n = attn.window ** 2
        expect = 16 * torch.sigmoid(table[state[key_enc].view(-1)].view(n, n, -1).permute(2, 0, 1))
        assert torch.allclose(attn.position_bias(), expect)
    assert (new_mu - base_mu).abs().max() > 1e-4
    assert (new_logits - base_logits).abs().max() > 1e-4
    # and the coordinate table / mask buffers likewise
    state2 = {k: v.clone() for k, v in vae.state_dict().items()}
    state2["encoder.net_blocks.0.blocks.1.attn_mask"].zero_()
    masked_off = reduced_vae()
    masked_off.load_state_dict(state2)
    with torch.no_grad():
        assert (masked_off.encode(occ).mean - base_mu).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------ errors
def test_wrong_input_shapes_raise():
    vae = reduced_vae()
    with pytest.raises(ValueError, match=r"expected \(B, 8, 8, 16\)"):
        vae.encode(torch.zeros(1, 8, 8, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(B, 8, 8, 16\)"):
        vae.encode(torch.zeros(8, 8, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(B, 8, 8, 16\)"):
        vae.encode(torch.zeros(1, 16, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected latents \(B, 16, 2, 2\)"):
        vae.decode(torch.zeros(1, 15, 2, 2))
    with pytest.raises(ValueError, match=r"expected latents \(B, 16, 2, 2\)"):
        vae.decode(torch.zeros(1, 16, 4, 4))


def test_inconsistent_or_unsupported_configs_raise():
    cfg = load_upstream_yaml(GOLDENS / "occfm_vae_reduced.yaml")
    base = {k: dict(v) for k, v in OccFmVAE.from_upstream_config(cfg).init_kwargs.items()}

    def build(section: str, **changes):
        kw = {k: dict(v) for k, v in base.items()}
        kw[section].update(changes)
        return OccFmVAE(**kw)

    with pytest.raises(ValueError, match="does not fit windows"):
        build("encoder", img_size=12)                       # 12 > window 4 and not a multiple of it
    with pytest.raises(ValueError, match="out_dim"):
        build("decoder", out_dim=64, patch_embed_dim=64)    # must be 16 heights × 8 features
    with pytest.raises(ValueError, match="input_channel"):
        build("decoder", input_channel=8)                   # != encoder latent_dim
    with pytest.raises(ValueError, match="temporal_block"):
        build("encoder", temporal_block=True)
    with pytest.raises(ValueError, match="downsample"):
        build("encoder", downsample=["patch_merge", "conv"])
    with pytest.raises(ValueError, match="lacks"):
        OccFmVAE(embedding={"num_cate": 18}, encoder=base["encoder"], decoder=base["decoder"])
