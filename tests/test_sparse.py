"""spconv first stage vs its dense conv3d equivalent: same parameters → same function and gradients; the
messages for a spconv build that does not fit torch."""
import re
from pathlib import Path

import pytest
import torch

from occ_mfd.models import sparse as S
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


# ---------------------------------------------------------------------------- spconv builds vs torch


@pytest.mark.parametrize("dists,torch_cuda,import_error,match", [
    ((), "12.4", None, r"spconv is not installed \(pip install spconv==2.3.8 for CPU; on a GPU: pip install "
                       r"spconv-cu126"),
    (("spconv-cu126",), "13.0", None, r"spconv has no CUDA 13 build: install a CUDA 12 torch .*whl/cu126\) to use "
                                      r"spconv, or keep the dense stem"),
    (("spconv", "spconv-cu120"), "12.4", None, r"several spconv builds .*pip uninstall -y spconv spconv-cu120"),
    (("spconv-cu120",), None, None, r"spconv-cu120 2.3.6 is a CUDA 12.0 build but torch 2.x\+cpu is CPU-only: "
                                    r"pip uninstall -y spconv-cu120 cumm-cu120 && pip install spconv==2.3.8"),
    (("spconv-cu118",), "12.4", None, r"built for CUDA 11.8 but torch 2.x\+cpu for CUDA 12.4"),
    (("spconv-cu120",), "12.4", "ImportError: libcuda.so.1", r"does not import \(ImportError: libcuda.so.1\)"),
])
def test_spconv_mismatch_messages(dists, torch_cuda, import_error, match):
    msg = S.check_spconv(dists, "2.3.6", import_error, torch_cuda, "2.x+cpu")
    assert msg is not None and "\n" not in msg
    assert re.search(match, msg), msg


@pytest.mark.parametrize("dists,torch_cuda", [(("spconv",), None), (("spconv",), "12.4"), (("spconv-cu120",), "12.4"),
                                              (("spconv-cu126",), "12.8"), (("spconv-cu124",), "12.1")])
def test_spconv_matching_builds_pass(dists, torch_cuda):
    # spconv-cu120 runs with any CUDA 12.x torch (CUDA minor-version compatibility), as do cu124 / cu126.
    assert S.check_spconv(dists, "2.3.8", None, torch_cuda, "2.x") is None


def test_cuda_spconv_with_cpu_torch_falls_back_with_one_warning_or_raises(monkeypatch, caplog):
    problem = S.check_spconv(("spconv-cu120",), "2.3.6", None, None, torch.__version__)
    monkeypatch.setattr(S, "spconv_status", lambda: S.SpconvStatus(("spconv-cu120",), "2.3.6", "12.0", False,
                                                                   problem))
    S._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="occ_mfd.models.sparse"):
        assert S.resolve_sparse("auto") is False
        assert S.resolve_sparse("auto") is False              # said once per process, not per module
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("warning: sparse='auto': using the dense stem: spconv-cu120 "
                                                   "2.3.6 is a CUDA 12.0 build") and "\n" not in lines[0]
    with pytest.raises(S.SparseUnavailable, match="sparse=True: spconv-cu120 2.3.6 is a CUDA 12.0 build"):
        S.OccupiedStem3d(3, 4, 2, sparse=True)
    # Not installed at all: "auto" is silently dense, as before.
    caplog.clear()
    monkeypatch.setattr(S, "spconv_status", lambda: S.SpconvStatus((), None, None, False, "not installed"))
    with caplog.at_level("WARNING", logger="occ_mfd.models.sparse"):
        assert S.resolve_sparse("auto") is False
    assert not caplog.records


def test_cpu_spconv_on_cuda_tensors_uses_the_dense_twin_or_raises(monkeypatch, caplog):
    """A CPU build asked to run on CUDA: 'auto' computes the same output with the dense twin (one warning),
    True raises saying what to install. The device check is faked (no GPU here)."""
    monkeypatch.setattr(S, "spconv_status", lambda: S.SpconvStatus(("spconv",), "2.3.8", None, True, None, True))
    assert "is the CPU build and cannot run on cuda:0: pip uninstall -y spconv && pip install spconv-cu126" in \
        S._device_problem(torch.device("cuda", 0))
    assert S._device_problem(torch.device("cpu")) is None
    monkeypatch.setattr(S, "_device_problem", lambda device: "fake: CPU build on CUDA")
    torch.manual_seed(4)
    auto, strict, dense = (S.OccupiedStem3d(3, 4, 2, sparse=m) for m in ("auto", True, False))
    strict.load_state_dict(auto.state_dict())
    dense.load_state_dict(auto.state_dict())
    occ = torch.rand(1, 6, 5, 4) < 0.4
    feats = torch.randn(1, 6, 5, 4, 3)
    S._warn_once.cache_clear()
    with caplog.at_level("WARNING", logger="occ_mfd.models.sparse"):
        assert torch.equal(auto(feats, occ), dense(feats, occ))
    assert [r.getMessage() for r in caplog.records] == ["warning: sparse='auto': using the dense stem: fake: CPU "
                                                        "build on CUDA"]
    with pytest.raises(S.SparseUnavailable, match="sparse=True: fake"):
        strict(feats, occ)


def test_spconv_status_of_this_install():
    st = S.spconv_status()
    if not st.installed:
        assert not st.usable and "not installed" in st.problem
        return
    assert st.usable == (st.problem is None) == spconv_available()
    if st.usable:
        assert isinstance(st.cpu_only, bool)                   # read from the imported build itself
        if st.dists == ("spconv",) and torch.version.cuda is None:
            assert st.cpu_only                                 # the CPU wheel


@needs_spconv
def test_spconv_matches_dense_in_eval_mode_and_full_config_uses_it():
    """eval() fuses spconv's bias into the kernel (train() adds it after): both match the dense twin. The
    full-size VAE config builds its stem through spconv when spconv is usable."""
    from mmengine.config import Config

    from occ_mfd.builder import build

    torch.manual_seed(5)
    a, b = OccupiedStem3d(5, 6, 2, sparse=True).eval(), OccupiedStem3d(5, 6, 2, sparse=False).eval()
    _random_bias(a)
    b.load_state_dict(a.state_dict())
    occ = torch.rand(2, 10, 9, 4) < 0.3
    feats = torch.randn(2, 10, 9, 4, 5)
    with torch.no_grad():
        assert torch.allclose(a(feats, occ), b(feats, occ), atol=1e-5)
    cfg = Config.fromfile(str(Path(__file__).resolve().parents[1] / "configs/nuscenes/vae.py"))
    vae = build(cfg.objective.vae.to_dict())
    assert vae.stem3d is not None and vae.stem3d.use_spconv


# ----------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_gpu_spconv_forward_backward_matches_dense(amp):
    """spconv's CUDA kernels (implicit GEMM) vs the dense twin, fp32 and under bf16 autocast (spconv computes
    in fp16 there; the dense twin in bf16), at Occ3D-like and dense occupancy."""
    if not spconv_available() or S._device_problem(torch.device("cuda")) is not None:
        pytest.skip(f"no CUDA spconv: {S.spconv_status().problem or S._device_problem(torch.device('cuda'))}")
    dev = torch.device("cuda")
    for shape, density in [((2, 64, 64, 16), 0.06), ((2, 16, 16, 8), 0.95)]:
        torch.manual_seed(0)
        a = OccupiedStem3d(12, 16, 2, sparse=True).to(dev)
        _random_bias(a)
        b = OccupiedStem3d(12, 16, 2, sparse=False).to(dev)
        b.load_state_dict(a.state_dict())
        occ = torch.rand(*shape, device=dev) < density
        feats = torch.randn(*shape, 12, device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            ya, yb = a(feats, occ), b(feats, occ)
        w = torch.randn_like(ya, dtype=torch.float32)
        (ya.float() * w).sum().backward()
        (yb.float() * w).sum().backward()
        tol = dict(rtol=3e-2, atol=3e-2) if amp else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ya.float(), yb.float(), **tol)
        assert (ya.float().abs().sum(1) > 0).float().mean() > 0
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            scale = pb.grad.abs().max().clamp_min(1.0)
            torch.testing.assert_close(pa.grad / scale, pb.grad / scale, **tol, msg=n)
        a.eval(), b.eval()                        # CUDA eval mode: spconv fuses the bias into its kernel
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            torch.testing.assert_close(a(feats, occ).float(), b(feats, occ).float(), **tol)
