"""LatentCache: LRU bookkeeping by hand, and the codec through it gives exactly the uncached latents and
conditions while encoding each frame (and each window's prior) once."""
import pytest
import torch

from occ_mfd.data.records import OccBatch
from occ_mfd.grid import GridSpec
from occ_mfd.models.codec import LatentCodec, LatentPrepare
from occ_mfd.models.latent_cache import LatentCache
from occ_mfd.models.vae import OccVAE


def test_fetch_encodes_only_missing_keys_in_order_and_evicts_the_least_recently_used():
    cache = LatentCache(max_mb=3 * 16 / 2**20)          # room for three (2, 2) float32 latents
    calls = []

    def encode(values):
        def f(idx):
            calls.append([values[i] for i in idx])
            return torch.stack([torch.full((2, 2), float(values[i])) for i in idx])
        return f

    out = cache.fetch(["a", "b"], encode([1, 2]))
    assert calls == [[1, 2]] and out[:, 0, 0].tolist() == [1.0, 2.0]
    out = cache.fetch(["b", "c", "a"], encode([2, 3, 1]))            # only c is new
    assert calls[-1] == [3] and out[:, 0, 0].tolist() == [2.0, 3.0, 1.0]
    # b and a were touched before c was stored in that fetch, so b is the least recently used: d evicts it
    cache.fetch(["d"], encode([4]))
    assert list(cache._store) == ["a", "c", "d"]
    # a hit that the same fetch's new keys evict is still returned
    out = cache.fetch(["a", "e", "f", "g"], encode([1, 5, 6, 7]))
    assert out[:, 0, 0].tolist() == [1.0, 5.0, 6.0, 7.0] and list(cache._store) == ["e", "f", "g"] and (cache.hits, cache.misses) == (3, 7)
    with pytest.raises(ValueError, match="deterministic"):
        LatentCodec(OccVAE(grid_z=8, channels=(8, 8), latent_channels=2, downsample=2, sparse=False),
                    sample=True, cache_mb=1)


def test_cached_codec_matches_the_uncached_one_and_encodes_each_frame_once():
    torch.manual_seed(0)
    grid = GridSpec((-6.4, -6.4, -1.0), (6.4, 6.4, 2.2), 0.4)               # 32 × 32 × 8
    vae = OccVAE(grid_z=8, channels=(8, 8), latent_channels=2, downsample=2, sparse=False).eval()
    plain, cached = LatentCodec(vae, scale=2.0), LatentCodec(vae, scale=2.0, cache_mb=16)
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 18, (7, *grid.shape), generator=g)             # a 7-frame scene
    ego = torch.eye(4).repeat(7, 1, 1)
    ego[:, 0, 3] = torch.arange(7.0) * 1.2

    def window(start):                                                       # P = 2, F = 3
        idx = list(range(start, start + 5))
        rel = torch.linalg.inv(ego[start + 1]) @ ego[idx]
        return idx, rel

    def batch(starts):
        ws = [window(s) for s in starts]
        occ = torch.stack([frames[i] for i, _ in ws])
        return OccBatch(past=occ[:, :2], future=occ[:, 2:], ego=torch.stack([r for _, r in ws]), grid=grid,
                        scenes=["s"] * len(starts), tokens=[[f"t{k}" for k in i] for i, _ in ws])

    encoded = []
    real_encode = cached.encode
    cached.encode = lambda occ, generator=None: encoded.append(occ.shape[0] * occ.shape[1]) or real_encode(occ)
    for starts in ([0, 1], [1, 2], [0, 2]):
        b = batch(starts)
        x_p, c_p = LatentPrepare(plain, "cv-warp")(b)
        x_c, c_c = LatentPrepare(cached, "cv-warp")(b)
        assert torch.allclose(x_c, x_p, atol=1e-5) and torch.allclose(c_c.past_latents, c_p.past_latents, atol=1e-5)
        # (encoding a frame alone or in a batch differs by float rounding, ~1e-6)
        assert torch.allclose(c_c.prior_latents, c_p.prior_latents, atol=1e-5)
    # frames 0..6 once each (7) + the 3 prior frames of each of the 3 windows (9)
    assert sum(encoded) == 7 + 9
    # a batch that does not name its frames bypasses the cache
    anon = batch([0, 1])
    anon.tokens = []
    n = len(cached.cache)
    assert torch.allclose(cached.encode_part(anon, "future"), plain.encode(anon.future), atol=1e-5)
    assert len(cached.cache) == n
