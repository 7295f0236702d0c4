"""The VAE encoder's first stage over occupied voxels only: spconv when importable, dense conv3d otherwise.

Both implementations compute the *same function with the same parameters*: a submanifold 3×3×3 conv
(outputs only at occupied voxels, inputs only from occupied voxels) → SiLU → a strided conv along z
(kernel = stride = ``z_stride``; an output exists where any input in its window is occupied). Inactive
sites are exactly zero. Parameters are stored once, in torch's Conv3d layout (out, in, kx, ky, kz), so a
checkpoint trained with spconv loads without it and vice versa; for spconv they are permuted to its KRSC
layout (out, kx, ky, kz, in) at call time and passed to spconv's public modules (``SubMConv3d``,
``SparseConv3d``) with ``torch.func.functional_call``.

spconv builds: ``spconv`` (CPU only, 2.3.8), ``spconv-cu120`` (2.3.6, CUDA 12.x, Python ≤ 3.11),
``spconv-cu121/124/126`` (2.3.8, Python 3.10-3.13); none for CUDA 13 (PyPI's default torch 2.13). The Python
API used here is the same in 2.3.6 and 2.3.8 (their spconv/pytorch sources differ only in the amp decorators).
A CUDA build also runs on CPU tensors with its native algorithm (chosen here per device). :func:`spconv_status`
checks that the installed build matches torch (a CUDA spconv with a CPU-only torch, a CUDA-major mismatch, two
builds installed over each other, a CPU build asked to run on CUDA tensors) and says in one line what to install;
``sparse="auto"`` then falls back to the dense twin with that line logged once as a warning, ``sparse=True``
raises :class:`SparseUnavailable`.

spconv CPU compatibility patch: 2.3.x's ops call ``torch.cuda.current_stream()`` through
``spconv.pytorch.cppcore.get_current_stream`` (imported by name into ``ops``/``hash``), which raises on
a CPU-only torch during backward. :func:`_patch_spconv_cpu_stream` replaces that function by one that
returns stream 0 when CUDA is unavailable (the only private spconv name touched, and only without CUDA). It is
idempotent, and does nothing when CUDA is available.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata as metadata
import math
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits
from torch import nn
from torch.func import functional_call

log = logging.getLogger(__name__)


class SparseUnavailable(ImportError):
    """``sparse=True`` but spconv is missing or does not match this torch (the message says what to install)."""


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


# ------------------------------------------------------------------------------------ spconv vs torch

CPU_INSTALL = "pip install spconv==2.3.8"
CUDA_INSTALL = ("pip install spconv-cu126 (2.3.8; or spconv-cu121 / spconv-cu124; spconv-cu120 is 2.3.6, "
                "Python ≤ 3.11) with a CUDA 12 torch")


@dataclass(frozen=True)
class SpconvStatus:
    """What is installed and whether the stem can use it. ``dists``: installed spconv distributions (e.g.
    ``["spconv-cu120"]``); ``cuda``: the CUDA version the distribution name says ("12.0"), None for ``spconv``;
    ``cpu_only``: the imported build has no CUDA kernels (spconv's own flag; None when it did not import);
    ``usable``: imports and matches torch; ``problem``: one line saying what is wrong and what to do."""

    dists: tuple[str, ...]
    version: str | None
    cuda: str | None
    usable: bool
    problem: str | None
    cpu_only: bool | None = None

    @property
    def installed(self) -> bool:
        return bool(self.dists)


def _spconv_dists() -> tuple[str, ...]:
    names = metadata.packages_distributions().get("spconv", [])
    return tuple(sorted({n.lower().replace("_", "-") for n in names}))


def _cuda_of(dist: str) -> str | None:
    """``spconv-cu120`` → "12.0", ``spconv-cu1xy`` → "1x.y"; ``spconv`` (CPU) → None."""
    m = re.fullmatch(r"spconv-cu(\d+)(\d)", dist)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def check_spconv(dists: tuple[str, ...], version: str | None, import_error: str | None,
                 torch_cuda: str | None, torch_version: str) -> str | None:
    """The mismatch rules, pure (tested without installing anything): None when the build fits this torch,
    else one line saying what to do."""
    if not dists:
        return (f"spconv is not installed ({CPU_INSTALL} for CPU; on a GPU: {CUDA_INSTALL}), or use sparse=False "
                f"(the dense stem computes the same function)")
    if len(dists) > 1:
        return (f"several spconv builds are installed over each other ({', '.join(dists)}): they share one "
                f"package folder; pip uninstall -y {' '.join(dists)}, then install one of them")
    cuda = _cuda_of(dists[0])
    if cuda is not None and torch_cuda is None:
        return (f"{dists[0]} {version or ''} is a CUDA {cuda} build but torch {torch_version} is CPU-only: "
                f"pip uninstall -y {dists[0]} cumm-cu{cuda.replace('.', '')} && {CPU_INSTALL}, or install a CUDA "
                f"build of torch").replace("  ", " ")
    if cuda is not None and torch_cuda is not None and cuda.split(".")[0] != torch_cuda.split(".")[0]:
        if int(torch_cuda.split(".")[0]) > 12:
            return (f"{dists[0]} is built for CUDA {cuda} but torch {torch_version} for CUDA {torch_cuda}, and spconv "
                    f"has no CUDA {torch_cuda.split('.')[0]} build: install a CUDA 12 torch (pip install torch "
                    f"--index-url https://download.pytorch.org/whl/cu126) to use spconv, or keep the dense stem")
        return (f"{dists[0]} is built for CUDA {cuda} but torch {torch_version} for CUDA {torch_cuda}: install the "
                f"spconv build of torch's CUDA major version ({CUDA_INSTALL})")
    if import_error is not None:
        return f"{dists[0]} {version or ''} is installed but does not import ({import_error}); reinstall it"
    return None


@functools.lru_cache(maxsize=1)
def spconv_status() -> SpconvStatus:
    """Inspect the installed spconv once per process (importing ``spconv.pytorch`` when it should work)."""
    dists = _spconv_dists()
    version = None
    if dists:
        try:
            version = metadata.version(dists[0])
        except metadata.PackageNotFoundError:
            pass
    import_error, cpu_only = None, None
    if dists and len(dists) == 1 and not (_cuda_of(dists[0]) and torch.version.cuda is None):
        try:
            importlib.import_module("spconv.pytorch")
        except Exception as e:  # ImportError, or a broken binary wheel
            import_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            # A source build is named "spconv" whatever it was built for: ask the build itself.
            flag = getattr(importlib.import_module("spconv.cppconstants"), "CPU_ONLY_BUILD", None)
            cpu_only = None if flag is None else bool(flag)
    problem = check_spconv(dists, version, import_error, torch.version.cuda, torch.__version__)
    if problem is None:
        _patch_spconv_cpu_stream()
    cuda = _cuda_of(dists[0]) if len(dists) == 1 else None
    return SpconvStatus(dists, version, cuda, problem is None, problem, cpu_only)


def spconv_available() -> bool:
    """True when spconv imports and matches torch (then the CPU stream patch is applied)."""
    return spconv_status().usable


def resolve_sparse(sparse: bool | str) -> bool:
    """Config switch ``True | False | "auto"`` → whether to use spconv. ``True`` without a usable spconv raises
    :class:`SparseUnavailable`; ``"auto"`` falls back to the dense stem, warning once when a spconv is installed
    but does not fit (silently when none is installed)."""
    if sparse == "auto":
        status = spconv_status()
        if status.installed and not status.usable:
            _warn_once(f"sparse='auto': using the dense stem: {status.problem}")
        return status.usable
    if sparse is True:
        status = spconv_status()
        if not status.usable:
            raise SparseUnavailable(f"sparse=True: {status.problem}")
        return True
    if sparse is False:
        return False
    raise ValueError(f"sparse must be True, False or 'auto', got {sparse!r}")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    """One line per distinct message and process, through ``logging`` (tools print it as a plain line)."""
    log.warning(f"warning: {message}")


def _device_problem(device: torch.device) -> str | None:
    """spconv cannot run on this device (a CPU-only build with CUDA tensors), else None."""
    if device.type != "cuda":
        return None
    status = spconv_status()
    if status.cpu_only if status.cpu_only is not None else status.cuda is None:
        return (f"the installed spconv ({', '.join(status.dists)} {status.version}) is the CPU build and cannot run "
                f"on {device}: pip uninstall -y spconv && {CUDA_INSTALL}")
    return None


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


class OccupiedStem3d(nn.Module):
    """(B, X, Y, Z, C_in) voxel features + (B, X, Y, Z) occupied mask → (B, C_out, X, Y, Z / z_stride)."""

    def __init__(self, in_ch: int, out_ch: int, z_stride: int = 2, sparse: bool | str = "auto"):
        super().__init__()
        self.z_stride = z_stride
        self.sparse_mode = sparse
        self.use_spconv = resolve_sparse(sparse)
        self.weight1 = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3, 3))
        self.bias1 = nn.Parameter(torch.zeros(out_ch))
        self.weight2 = nn.Parameter(torch.empty(out_ch, out_ch, 1, 1, z_stride))
        self.bias2 = nn.Parameter(torch.zeros(out_ch))
        for w in (self.weight1, self.weight2):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        # spconv modules (per device type) only carry the index bookkeeping and the algorithm; kept out of the
        # module tree (no parameters saved: ours are passed in at call time).
        self._sp: dict[str, tuple[nn.Module, nn.Module]] = {}

    def forward(self, feats: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        if feats.shape[-1] != self.weight1.shape[1] or feats.shape[:-1] != occupied.shape:
            raise ValueError(f"OccupiedStem3d: feats {tuple(feats.shape)} / mask {tuple(occupied.shape)} mismatch")
        if occupied.shape[-1] % self.z_stride:
            raise ValueError(f"OccupiedStem3d: Z={occupied.shape[-1]} not divisible by z_stride={self.z_stride}")
        if self.use_spconv:
            problem = _device_problem(feats.device)
            if problem is None:
                return self._forward_sparse(feats, occupied)
            if self.sparse_mode is True:
                raise SparseUnavailable(f"sparse=True: {problem}")
            _warn_once(f"sparse='auto': using the dense stem: {problem}")
        return self._forward_dense(feats, occupied)

    def _forward_dense(self, feats: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        m = occupied[:, None].to(feats.dtype)                      # (B, 1, X, Y, Z)
        x = feats.permute(0, 4, 1, 2, 3) * m                        # (B, C, X, Y, Z)
        h = F.silu(F.conv3d(x, self.weight1, self.bias1, padding=1) * m)  # submanifold: outputs at occupied only
        s = (1, 1, self.z_stride)
        out_mask = F.max_pool3d(m, kernel_size=s, stride=s)         # (B, 1, X, Y, Z/s): any occupied input
        return F.conv3d(h, self.weight2, self.bias2, stride=s) * out_mask

    def _spconv_modules(self, device: torch.device) -> tuple[nn.Module, nn.Module]:
        """spconv's public SubMConv3d / SparseConv3d for this device type: on CPU the native algorithm (the only
        one a CPU tensor can use, also with a CUDA build), on CUDA spconv's default (implicit GEMM)."""
        if device.type not in self._sp:
            import spconv.pytorch as spconv

            c_out, c_in = self.weight1.shape[:2]
            s = (1, 1, self.z_stride)
            algo = {"algo": spconv.ConvAlgo.Native} if device.type == "cpu" else {}
            self._sp[device.type] = (
                spconv.SubMConv3d(c_in, c_out, 3, padding=1, bias=True, indice_key="occ_subm", **algo),
                spconv.SparseConv3d(c_out, c_out, s, stride=s, bias=True, **algo),
            )
        return self._sp[device.type]

    def _forward_sparse(self, feats: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        subm, down = self._spconv_modules(feats.device)
        # spconv's eval mode fuses the bias into the kernel, which its CPU kernels do not support ("cpu don't
        # support act and bias"): on CPU its training mode, which adds the bias afterwards (the same output).
        fused_bias = not self.training and feats.device.type == "cuda"
        subm.train(not fused_bias)
        down.train(not fused_bias)
        B, X, Y, Z = occupied.shape
        # (N, 4): batch, x, y, z. nonzero() returns a column-major tensor and spconv reads the raw buffer
        # as row-major, silently scrambling neighbours: .contiguous() is required.
        idx = occupied.nonzero().int().contiguous()
        params = (self.weight1, self.bias1, self.weight2, self.bias2)
        zs = Z // self.z_stride

        def stages(values, w1, b1, w2, b2):
            import spconv.pytorch as spconv

            krsc = lambda w: w.permute(0, 2, 3, 4, 1).contiguous()  # torch (O, I, kx, ky, kz) → spconv KRSC
            x = spconv.SparseConvTensor(values, idx, [X, Y, Z], B)
            x = functional_call(subm, {"weight": krsc(w1), "bias": b1}, (x,))
            x = x.replace_feature(F.silu(x.features))
            x = functional_call(down, {"weight": krsc(w2), "bias": b2}, (x,))
            # Scatter to the dense grid ourselves (SparseConvTensor.dense() indexes with a list, which torch
            # deprecates): inactive sites are exactly zero.
            out = x.features.new_zeros(B, X, Y, zs, x.features.shape[1])
            i = x.indices.long()
            out = out.index_put((i[:, 0], i[:, 1], i[:, 2], i[:, 3]), x.features)
            return out.permute(0, 4, 1, 2, 3)                      # (B, C, X, Y, Z/s)

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
