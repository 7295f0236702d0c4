"""spconv first stage vs its dense conv3d equivalent: same parameters → same function and gradients."""
import pytest
import torch

from occ_mfd.models.sparse import OccupiedStem3d, resolve_sparse, spconv_available
from occ_mfd.models.vae import OccVAE

needs_spconv = pytest.mark.skipif(not spconv_available(), reason="spconv not installed (sparse extra)")


def _random_bias(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("bias"):
                p.normal_()


def test_dense_stem_is_submanifold_and_hand_case():
    stem = OccupiedStem3d(1, 1, z_stride=2, sparse=False)
    with torch.no_grad():
        stem.weight1.zero_(); stem.weight1[0, 0, 2, 1, 1] = 1.0   # output at x reads input at x+1
        stem.bias1.fill_(0.5)
        stem.weight2.fill_(1.0); stem.bias2.zero_()               # sum over the z pair
    occ = torch.zeros(1, 4, 1, 2, dtype=torch.bool)
    occ[0, 1, 0, 0] = occ[0, 2, 0, 0] = True
    feats = torch.zeros(1, 4, 1, 2, 1)
    feats[0, 1, 0, 0, 0], feats[0, 2, 0, 0, 0] = 3.0, 5.0
    feats[0, 3, 0, 0, 0] = 100.0                                    # unoccupied: must be ignored
    out = stem(feats, occ)                                          # (1, 1, 4, 1, 1)
    silu = lambda v: v * torch.sigmoid(torch.tensor(v))
    expected = torch.tensor([0.0, silu(5.5), silu(0.5), 0.0])       # voxel 2 reads unoccupied x=3 → 0
    assert torch.allclose(out[0, 0, :, 0, 0], expected, atol=1e-6)


def test_resolve_sparse_switch():
    assert resolve_sparse(False) is False
    assert resolve_sparse("auto") is spconv_available()
    with pytest.raises(ValueError):
        resolve_sparse("yes")


@needs_spconv
@pytest.mark.parametrize("shape,density", [((2, 9, 7, 4), 0.3), ((2, 16, 16, 8), 0.95)])
def test_spconv_matches_dense_forward_and_backward(shape, density):
    torch.manual_seed(0)
    a = OccupiedStem3d(5, 6, 2, sparse=True)
    _random_bias(a)
    b = OccupiedStem3d(5, 6, 2, sparse=False)
    b.load_state_dict(a.state_dict())
    occ = torch.rand(*shape) < density
    feats = torch.randn(*shape, 5)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # spconv's CPU kernels race with >1 thread on dense inputs unless guarded
    try:
        ya, yb = a(feats, occ), b(feats, occ)
        w = torch.randn_like(ya)
        (ya * w).sum().backward()             # CPU backward exercises the get_current_stream patch
        (yb * w).sum().backward()
    finally:
        torch.set_num_threads(n_threads)
    assert torch.allclose(ya, yb, atol=1e-5)
    assert ya.abs().sum() > 0
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-4)


@needs_spconv
def test_vae_sparse_and_dense_paths_agree():
    torch.manual_seed(1)
    kw = dict(grid_z=4, channels=(8, 16), latent_channels=4, downsample=2, stem3d_channels=4)
    a, b = OccVAE(sparse=True, **kw), OccVAE(sparse=False, **kw)
    _random_bias(a.stem3d)
    b.load_state_dict(a.state_dict())
    occ = torch.randint(0, 18, (2, 8, 8, 4))
    da, db = a.encode(occ), b.encode(occ)
    assert torch.allclose(da.mean, db.mean, atol=1e-5) and torch.allclose(da.logvar, db.logvar, atol=1e-5)


@needs_spconv
def test_cpu_stream_patch_idempotent():
    import spconv.pytorch.cppcore as cppcore
    import spconv.pytorch.ops as ops

    spconv_available(); spconv_available()
    if not torch.cuda.is_available():
        assert cppcore.get_current_stream() == 0 and ops.get_current_stream is cppcore.get_current_stream


@needs_spconv
def test_spconv_no_grad_path_matches_and_restores_threads():
    torch.manual_seed(2)
    a = OccupiedStem3d(3, 4, 2, sparse=True)
    b = OccupiedStem3d(3, 4, 2, sparse=False)
    b.load_state_dict(a.state_dict())
    occ = torch.rand(2, 12, 12, 4) < 0.9
    feats = torch.randn(2, 12, 12, 4, 3)
    n = torch.get_num_threads()
    with torch.no_grad():
        assert torch.allclose(a(feats, occ), b(feats, occ), atol=1e-5)
    assert torch.get_num_threads() == n


def test_single_thread_guard_is_local_to_the_calling_thread():
    """spconv's CPU calls run with one OpenMP thread in the calling thread only: a thread started meanwhile
    keeps torch's thread count (torch.set_num_threads would have changed it for the whole process), and
    the caller's count comes back even when the body raises."""
    import threading

    from occ_mfd.models.sparse import _single_thread_on_cpu

    n0 = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with pytest.raises(RuntimeError, match="inside"), _single_thread_on_cpu(torch.device("cpu")):
            seen.append(torch.get_num_threads())
            t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            t.start()
            t.join()
            raise RuntimeError("inside")
        assert seen == [1, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n0)
