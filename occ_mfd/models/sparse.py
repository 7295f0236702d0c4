"""The VAE encoder's first stage over occupied voxels only: spconv when importable, dense conv3d otherwise.

Both implementations compute the *same function with the same parameters*: a submanifold 3×3×3 conv
(outputs only at occupied voxels, inputs only from occupied voxels) → SiLU → a strided conv along z
(kernel = stride = ``z_stride``; an output exists where any input in its window is occupied). Inactive
sites are exactly zero, as spconv's ``.dense()`` gives. Parameters are stored once, in torch's Conv3d
layout (out, in, kx, ky, kz), so a checkpoint trained with spconv loads without it and vice versa;
for spconv they are permuted to its KRSC layout (out, kx, ky, kz, in) at call time.

spconv 2.3.8 compatibility patch: its ops call ``torch.cuda.current_stream()`` through
``spconv.pytorch.cppcore.get_current_stream`` (imported by name into ``ops``/``hash``), which raises on
a CPU-only torch during backward. :func:`_patch_spconv_cpu_stream` replaces that function by one that
returns stream 0 when CUDA is unavailable. It is idempotent, and does nothing when CUDA is available.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn


def _patch_spconv_cpu_stream() -> None:
    if torch.cuda.is_available():
        return
    cppcore = importlib.import_module("spconv.pytorch.cppcore")
    if getattr(cppcore.get_current_stream, "_occ_mfd_cpu_patch", False):
        return

    def get_current_stream() -> int:  # CPU: spconv only needs a stream handle, 0 = default
        return 0

    get_current_stream._occ_mfd_cpu_patch = True
    for name in ("spconv.pytorch.cppcore", "spconv.pytorch.ops", "spconv.pytorch.hash"):
        mod = importlib.import_module(name)
        if hasattr(mod, "get_current_stream"):
            mod.get_current_stream = get_current_stream


@contextlib.contextmanager
def _single_thread_on_cpu(device: torch.device):
    """Run the body with one OpenMP thread *in the calling thread only* (CPU; a no-op on other devices).

    Why: spconv 2.3.8's CPU kernels give run-to-run different, wrong sums when their OpenMP loops run on
    several threads on dense-ish inputs (cf. traveller59/spconv#679; reproduced here at 95 % occupancy,
    batch 2, 2 threads). One thread is exact.

    How: spconv's wheel bundles a libgomp, but its ``GOMP_*`` symbols bind to the libgomp torch loaded
    first (``LD_DEBUG=bindings``), so those loops run on torch's OpenMP runtime — and limiting only
    spconv's bundled copy does not help (measured). OpenMP's thread count (``nthreads-var``) is a
    per-thread setting: ``threadpoolctl`` sets it to 1 in every loaded OpenMP runtime for this thread
    and restores it on exit, exceptions included. Unlike ``torch.set_num_threads`` this leaves
    process-wide state alone: other threads keep their count, threads started meanwhile get torch's
    default, and overlapping callers cannot restore each other's values. torch's own CPU ops in the
    body (OpenMP too) also run single-threaded, as before; MKL's gemm keeps its own thread count.
    """
    if device.type != "cpu":
        yield
        return
    # torch sets this thread's OpenMP count from its process default on the thread's first op: make that
    # happen now, so it cannot undo the limit inside the body (a fresh autograd or user thread).
    torch.get_num_threads()
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def spconv_available() -> bool:
    """True when ``spconv.pytorch`` imports (and then the CPU stream patch is applied)."""
    try:
        importlib.import_module("spconv.pytorch")
    except Exception:  # ImportError, or a broken binary wheel
        return False
    _patch_spconv_cpu_stream()
    return True


def resolve_sparse(sparse: bool | str) -> bool:
    """Config switch ``True | False | "auto"`` → whether to use spconv (True without spconv is an error)."""
    if sparse == "auto":
        return spconv_available()
    if sparse is True:
        if not spconv_available():
            raise ImportError("sparse=True needs spconv (pip install 'occ-mfd[sparse]'); use sparse='auto'")
        return True
    if sparse is False:
        return False
    raise ValueError(f"sparse must be True, False or 'auto', got {sparse!r}")


class OccupiedStem3d(nn.Module):
    """(B, X, Y, Z, C_in) voxel features + (B, X, Y, Z) occupied mask → (B, C_out, X, Y, Z / z_stride)."""

    def __init__(self, in_ch: int, out_ch: int, z_stride: int = 2, sparse: bool | str = "auto"):
        super().__init__()
        self.z_stride = z_stride
        self.use_spconv = resolve_sparse(sparse)
        self.weight1 = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3, 3))
        self.bias1 = nn.Parameter(torch.zeros(out_ch))
        self.weight2 = nn.Parameter(torch.empty(out_ch, out_ch, 1, 1, z_stride))
        self.bias2 = nn.Parameter(torch.zeros(out_ch))
        for w in (self.weight1, self.weight2):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        # spconv modules only carry the index bookkeeping; kept out of the module tree (no parameters saved).
        self._sp = None

    def forward(self, feats: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        if feats.shape[-1] != self.weight1.shape[1] or feats.shape[:-1] != occupied.shape:
            raise ValueError(f"OccupiedStem3d: feats {tuple(feats.shape)} / mask {tuple(occupied.shape)} mismatch")
        if occupied.shape[-1] % self.z_stride:
            raise ValueError(f"OccupiedStem3d: Z={occupied.shape[-1]} not divisible by z_stride={self.z_stride}")
        return self._forward_sparse(feats, occupied) if self.use_spconv else self._forward_dense(feats, occupied)

    def _forward_dense(self, feats: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        m = occupied[:, None].to(feats.dtype)                      # (B, 1, X, Y, Z)
        x = feats.permute(0, 4, 1, 2, 3) * m                        # (B, C, X, Y, Z)
        h = F.silu(F.conv3d(x, self.weight1, self.bias1, padding=1) * m)  # submanifold: outputs at occupied only
        s = (1, 1, self.z_stride)
        out_mask = F.max_pool3d(m, kernel_size=s, stride=s)         # (B, 1, X, Y, Z/s): any occupied input
        return F.conv3d(h, self.weight2, self.bias2, stride=s) * out_mask

    def _build_spconv(self):
        import spconv.pytorch as spconv

        c_out, c_in = self.weight1.shape[:2]
        s = (1, 1, self.z_stride)
        self._sp = (
            spconv.SubMConv3d(c_in, c_out, 3, padding=1, bias=True, indice_key="occ_subm"),
            spconv.SparseConv3d(c_out, c_out, s, stride=s, bias=True),
        )

    def _forward_sparse(self, feats: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        if self._sp is None:
            self._build_spconv()
        B, X, Y, Z = occupied.shape
        # (N, 4): batch, x, y, z. nonzero() returns a column-major tensor and spconv reads the raw buffer
        # as row-major, silently scrambling neighbours: .contiguous() is required.
        idx = occupied.nonzero().int().contiguous()
        params = (self.weight1, self.bias1, self.weight2, self.bias2)

        def stages(values, w1, b1, w2, b2):
            import spconv.pytorch as spconv

            subm, down = self._sp
            krsc = lambda w: w.permute(0, 2, 3, 4, 1).contiguous()  # torch (O, I, kx, ky, kz) → spconv KRSC
            x = spconv.SparseConvTensor(values, idx, [X, Y, Z], B)
            x = subm._conv_forward(self.training, x, krsc(w1), b1, name=subm.name)
            x = x.replace_feature(F.silu(x.features))
            x = down._conv_forward(self.training, x, krsc(w2), b2, name=down.name)
            return x.dense()                                        # (B, C, X, Y, Z/s)

        values = feats[occupied]                                    # (N, C_in)
        if feats.device.type != "cpu":
            return stages(values, *params)
        if not (torch.is_grad_enabled() and any(x.requires_grad for x in (values, *params))):
            with _single_thread_on_cpu(feats.device):
                return stages(values, *params)
        return _SingleThreadCPU.apply(stages, values, *params)


class _SingleThreadCPU(torch.autograd.Function):
    """Run ``fn(*inputs)`` *and its backward* with one OpenMP thread (see :func:`_single_thread_on_cpu`).

    The inner graph is built on detached leaves in forward and differentiated in backward, so spconv's
    own backward kernels also run single-threaded (the autograd engine would otherwise use all threads).
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        leaves = [x.detach().requires_grad_(x.requires_grad) for x in inputs]
        with torch.enable_grad(), _single_thread_on_cpu(torch.device("cpu")):
            out = fn(*leaves)
        ctx.inner = (out, leaves)
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out):
        out, leaves = ctx.inner
        wanted = [x for x in leaves if x.requires_grad]
        with _single_thread_on_cpu(torch.device("cpu")):
            grads = iter(torch.autograd.grad(out, wanted, grad_out, allow_unused=True)) if wanted else iter(())
        del ctx.inner
        return (None, *[next(grads) if x.requires_grad else None for x in leaves])
