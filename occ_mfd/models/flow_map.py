"""Two-time flow maps built from a velocity network (``../shared/DISTILLERS.md`` §0.3 (M), §0.4, §0.6).

A flow map X(x, s, t, c) = x + (t − s)·u(x, s, t, c) jumps from time s to time t (s ≤ t; t = 0 noise, t = 1 data);
u is the average velocity over [s, t]. AYF, MeanFlow and their kin train u. Here

    u_θ(x, s, t, c) = net(x, s, c)  with  dt_path(t − s) added to the output of one of net's modules,

i.e. a teacher velocity network gets a second time input, Δt = t − s, on top of its own time path (FastGen's
``time_cond_type="diff"``). The Δt path's **last Linear is zero-initialised** (weight and bias), so at init
u_θ(x, s, t) ≡ net(x, s) for every t: the flow-map student starts as the teacher, and X(z, 0, 1) is the teacher's
one-step Euler jump, the same start as the one-step (G) students. Only the last layer is zeroed, not the whole
path (DISTILLERS.md F3: an all-zero MLP passes no gradient to its weights and could never depend on Δt).

Two Δt paths, for the two kinds of network in the project:
* ``dt_path="time_mlp"`` (OccForecaster): a copy of the network's time MLP ``inject_at`` (its inner layers keep
  the teacher's weights), fed ``timestep_embedding(t − s)`` like the original; its output is added to the time
  MLP's, so emb = time_mlp(temb(s)) + dt_mlp(temb(t − s)) + traj·keep (§0.4).
* ``dt_path="fourier"`` (the toy MLPs): features [Δ, sin(kπΔ), cos(kπΔ)], k = 1..K, through one zero-initialised
  Linear added to the output of the network's first Linear ``inject_at`` — the same function as appending the
  features to the first Linear's input with zero-initialised columns (§0.4).

The addition is done by a forward hook on ``inject_at`` that exists only for the duration of one call (nothing
persists, so deep copies, state_dicts and ``torch.func`` transforms see a plain module); the wrapped network
is not edited, so any network whose embedding passes through one module once per forward can be wrapped (a
network that calls ``inject_at`` a different number of times is refused at the first call).

:class:`FlowMapEndpoint` presents a flow map as a velocity network, ``v(x, t, c) = u(x, s=t, t=1, c)``, so the
one-step Euler pipeline (``OccForecastPipeline``, steps = 1, x1 = x0 + 1·v(x0, 0)) samples X(x0, 0, 1) exactly.
For K steps the pipeline calls :meth:`FlowMapEndpoint.sample_grid`, the flow map's own sampler
(:func:`flow_map_sample`, DISTILLERS.md §0.4): x ← x + (t_{k+1} − t_k)·u(x, t_k, t_{k+1}) on the pipeline's grid
(for steps = 1 the same jump as above). Composing exact maps is exact, so a perfect flow map gives the same
sample at every K, while Euler on the endpoint field would not; at initialisation (u ≡ the teacher) the K-step
flow-map sampler is the teacher's K-step Euler.

:func:`flow_map_jvp` is the JVP the flow-map objectives need (§0.6): ``torch.func.jvp`` in fp32 (autocast off), with
the math SDPA kernel (the flash / memory-efficient / CPU-flash kernels have no forward-mode AD), or a central
finite difference; under ``no_grad`` (MeanFlow, AYF, SMF, FreeFlow) or, with ``with_grad=True``, differentiable
with respect to the network's parameters (TVM backpropagates through the JVP). :class:`JvpBackend` adds the "auto"
choice: ``torch.func.jvp`` until it fails once, then the difference for the rest of the run.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from occ_mfd.builder import build
from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import expand_time
from occ_mfd.models.embeddings import timestep_embedding
from occ_mfd.models.snapshot import network_spec

log = logging.getLogger(__name__)
DT_PATHS = ("time_mlp", "fourier")
JVP_METHODS = ("func", "fd")
JVP_CHOICES = ("auto",) + JVP_METHODS


def _build_spec(spec: nn.Module | dict) -> nn.Module:
    """A module, or a ``network_spec`` dict ({"class", "kwargs"}) as stored in snapshots → the module."""
    if isinstance(spec, nn.Module):
        return spec
    return build({"type": spec["class"], **spec["kwargs"]})


def _spec_or_none(module: nn.Module) -> dict | None:
    return network_spec(module) if isinstance(getattr(module, "init_kwargs", None), dict) else None


def _zero_last_linear(module: nn.Module) -> None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the Δt path {type(module).__name__} has no Linear layer to zero-initialise")
    nn.init.zeros_(linears[-1].weight)
    if linears[-1].bias is not None:
        nn.init.zeros_(linears[-1].bias)


class FlowMapNet(nn.Module):
    """``forward(x (B, ...), s (B,), t (B,), cond, drop_cond=None) -> u (B, ...)``: see the module docstring.

    Args:
        net: the velocity network ``net(x, t, cond, drop_cond)`` (a teacher copy), or its ``network_spec`` dict.
        inject_at: dotted name of the module of ``net`` whose output receives the Δt embedding.
        dt_path: "time_mlp" (copy of ``inject_at``, an MLP on ``timestep_embedding``) or "fourier" (one Linear on
            Fourier features of Δt; ``inject_at`` must be a Linear).
        dt_freqs: K of the Fourier features.
    """

    def __init__(self, net: nn.Module | dict, inject_at: str = "time_mlp", dt_path: str = "time_mlp",
                 dt_freqs: int = 4):
        super().__init__()
        if dt_path not in DT_PATHS:
            raise ValueError(f"dt_path must be one of {DT_PATHS}, got {dt_path!r}")
        self.net = _build_spec(net)
        self.inject_at, self.dt_path, self.dt_freqs = inject_at, dt_path, int(dt_freqs)
        target = self.net.get_submodule(inject_at)
        if dt_path == "time_mlp":
            first = next((m for m in target.modules() if isinstance(m, nn.Linear)), None)
            if first is None:
                raise ValueError(f"dt_path='time_mlp': {inject_at!r} ({type(target).__name__}) has no Linear layer")
            self.dt_embed = copy.deepcopy(target)            # the teacher's inner layers, last Linear zeroed below
            self.dt_dim = first.in_features
        else:
            if not isinstance(target, nn.Linear):
                raise ValueError(f"dt_path='fourier' adds to a Linear's output; {inject_at!r} is "
                                 f"{type(target).__name__}")
            self.dt_embed = nn.Linear(1 + 2 * self.dt_freqs, target.out_features)
            self.dt_dim = 1 + 2 * self.dt_freqs
        self.dt_embed.to(next(target.parameters()).dtype)
        self.dt_embed.requires_grad_(True)
        _zero_last_linear(self.dt_embed)
        spec = _spec_or_none(self.net)
        if spec is not None:                                 # rebuildable from a snapshot (models/snapshot.py)
            self.init_kwargs = {"net": spec, "inject_at": inject_at, "dt_path": dt_path, "dt_freqs": self.dt_freqs}

    @property
    def prior(self) -> str | None:
        """The wrapped network's ego-motion prior: what the condition must carry (``OccForecaster(prior=)``)."""
        return getattr(self.net, "prior", None)

    @property
    def residual(self) -> bool:
        """Whether the wrapped network generates future − prior latents (the pipeline adds the prior back)."""
        return getattr(self.net, "residual", False)

    def dt_features(self, dt: torch.Tensor) -> torch.Tensor:
        """(B,) Δt = t − s → (B, dt_dim) input of the Δt path."""
        if self.dt_path == "time_mlp":
            return timestep_embedding(dt, self.dt_dim)       # ×1000 inside, as the network's own time path
        k = torch.arange(1, self.dt_freqs + 1, device=dt.device, dtype=dt.dtype) * math.pi
        return torch.cat([dt[:, None], torch.sin(dt[:, None] * k), torch.cos(dt[:, None] * k)], dim=1)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: Any = None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        s, t = torch.as_tensor(s).expand(B), torch.as_tensor(t).expand(B)
        extra = self.dt_embed(self.dt_features((t - s).to(x.dtype)))        # (B, D)
        calls = []

        def add(_module, _inputs, out):
            calls.append(1)
            return out + extra.to(out.dtype)

        handle = self.net.get_submodule(self.inject_at).register_forward_hook(add)
        try:
            u = self.net(x, s, cond, drop_cond=drop_cond)
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError(f"FlowMapNet: {type(self.net).__name__}.{self.inject_at} ran {len(calls)} times in "
                               f"one forward; the Δt embedding must enter exactly once")
        return u


class FlowMapEndpoint(nn.Module):
    """A flow map as a velocity network: ``forward(x, t, cond, drop_cond=None) = flow_map(x, s=t, t=1, cond)``.

    x0 + 1·forward(x0, 0) = X(x0, 0, 1): the one-step Euler pipeline samples the flow map exactly. ``flow_map``: a
    module ``fm(x, s, t, cond, drop_cond)`` (e.g. :class:`FlowMapNet`) or its ``network_spec`` dict.
    """

    def __init__(self, flow_map: nn.Module | dict):
        super().__init__()
        self.flow_map = _build_spec(flow_map)
        spec = _spec_or_none(self.flow_map)
        if spec is not None:
            self.init_kwargs = {"flow_map": spec}

    @property
    def prior(self) -> str | None:
        """The flow map's ego-motion prior (the pipeline builds the condition from it)."""
        return getattr(self.flow_map, "prior", None)

    @property
    def residual(self) -> bool:
        return getattr(self.flow_map, "residual", False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t).expand(x.shape[0])
        return self.flow_map(x, t, torch.ones_like(t), cond, drop_cond=drop_cond)

    def sample_grid(self, x0: torch.Tensor, grid: torch.Tensor, cond: Any = None, cfg_scale: float = 1.0,
                    fused: bool = True) -> torch.Tensor:
        """The flow map's K-step sampler on ``grid`` (K+1,) from x0 (B, ...): see :func:`flow_map_sample`. The
        pipeline calls this in place of Euler when its network has it."""
        return flow_map_sample(self.flow_map, x0, grid, cond, cfg_scale=cfg_scale, fused=fused)


def is_flow_map(net: nn.Module) -> bool:
    """Whether ``net`` (a snapshot's "net") takes an interval input, i.e. is a flow map behind its endpoint."""
    return isinstance(net, FlowMapEndpoint)


def flow_map_jvp(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                 method: str = "func", eps: float = 1e-4,
                 with_grad: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(fn(*primals) or None, d/dε fn(primals + ε·tangents) at ε = 0), without grad unless ``with_grad``.

    ``with_grad=True`` keeps the autograd graph to the parameters fn closes over (reverse over forward mode: the
    tangent is differentiable, as TVM needs); the primals and tangents themselves are still detached. [Measured]
    PyTorch 2.13's fused layer_norm gives its forward-mode tangent a wrong parameter gradient (6.8 % off on the tiny
    forecaster, 14 % on Linear → LayerNorm → Linear, against fp64 differences; related reports: pytorch/pytorch#196700,
    layer_norm's nested forward-mode derivative is wrong, and PR #176234, its saved mean / inverse std carry no
    autograd history), so with grad and ``method="func"`` every ``F.layer_norm`` is computed from primitive ops
    (:class:`DecomposedLayerNorm`; tests/test_flow_map_distillers.py checks both cases against the difference).

    ``method="func"``: ``torch.func.jvp`` (exact; returns the primal output too). ``"fd"``: central difference
    (fn(p + ε·v) − fn(p − ε·v)) / 2ε, 2 evaluations, any attention kernel, no primal (None). Both run in at least
    fp32 with autocast off and the math SDPA kernel (DISTILLERS.md §0.6: forward-mode AD exists only for it; fp32
    as FastGen's ``precision_amp_jvp``). [Decision] The FD fallback runs in the network's dtype (fp32), not in fp64
    as FastGen's ``_estimate_jvp_finite_difference`` suggests (that would need an fp64 copy of the network per
    call). ε = 1e-4 (FastGen's default): the ×1000 time embedding turns a time step ε into a phase step of up to
    1000·ε, so the Wan config's 5e-3 was measured here to be far off (≈ 100 % error on the tiny forecaster), while
    1e-4 is within 1 %. The fp64 difference is the test's reference (tests/test_flow_map.py).
    """
    if method not in JVP_METHODS:
        raise ValueError(f"jvp method must be one of {JVP_METHODS}, got {method!r}")
    dtype = torch.promote_types(primals[0].dtype, torch.float32)
    primals = tuple(p.detach().to(dtype) for p in primals)
    tangents = tuple(v.detach().to(dtype) for v in tangents)
    grad = with_grad and torch.is_grad_enabled()
    with torch.set_grad_enabled(grad), torch.autocast(device_type=primals[0].device.type, enabled=False), \
            sdpa_kernel(SDPBackend.MATH):
        if method == "func":
            if grad:
                with DecomposedLayerNorm():
                    return torch.func.jvp(fn, primals, tangents)
            return torch.func.jvp(fn, primals, tangents)
        plus = fn(*(p + eps * v for p, v in zip(primals, tangents)))
        minus = fn(*(p - eps * v for p, v in zip(primals, tangents)))
        return None, (plus - minus) / (2 * eps)


def _layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` from primitive ops (mean, rsqrt): every op's forward-mode rule is differentiable."""
    dims = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


class DecomposedLayerNorm(TorchFunctionMode):
    """Within this context ``torch.nn.functional.layer_norm`` (hence ``nn.LayerNorm``) runs as :func:`_layer_norm`
    (see :func:`flow_map_jvp`: the fused kernel's tangent has a wrong gradient). Scoped to the ``with`` block."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


class JvpBackend:
    """``jvp(fn, primals, tangents, with_grad=False)`` with the "auto" | "func" | "fd" choice of the objectives.

    "auto": ``torch.func.jvp`` until forward-mode AD fails (a kernel without a jvp rule), then, with a warning, the
    central difference (ε = ``eps``) for the rest of the run; "func" / "fd" force one. ``method`` is the one in use.
    Returns (primal or None (the difference has none), tangent), as :func:`flow_map_jvp`.
    """

    def __init__(self, choice: str = "auto", eps: float = 1e-4, what: str = "flow map"):
        if choice not in JVP_CHOICES:
            raise ValueError(f"jvp must be one of {JVP_CHOICES}, got {choice!r}")
        if eps <= 0:
            raise ValueError(f"fd_eps must be > 0, got {eps}")
        self.choice, self.eps, self.what = choice, float(eps), what
        self.method = "fd" if choice == "fd" else "func"

    def __call__(self, fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor],
                 tangents: Sequence[torch.Tensor], with_grad: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.method == "func":
            try:
                return flow_map_jvp(fn, primals, tangents, method="func", with_grad=with_grad)
            except (RuntimeError, NotImplementedError) as e:
                if self.choice != "auto":
                    raise
                log.warning("%s: torch.func.jvp failed (%s); using a central finite difference (eps=%g) from now on",
                            self.what, e, self.eps)
                self.method = "fd"
        return flow_map_jvp(fn, primals, tangents, method="fd", eps=self.eps, with_grad=with_grad)


def require_flow_map(student: nn.Module, method: str) -> None:
    """A clear error when a flow-map objective is handed a network without an interval input (s, t)."""
    if not is_flow_map(student):
        raise ValueError(f"{method} trains a two-time flow map: the student must be a models.flow_map.FlowMapEndpoint "
                         f"(a velocity net wrapped by FlowMapNet), got {type(student).__name__}, which has no "
                         f"interval input (s, t)")


def flow_map_sample(flow_map: Callable[..., torch.Tensor], x0: torch.Tensor, grid: torch.Tensor, cond: Any = None,
                    cfg_scale: float = 1.0, fused: bool = True) -> torch.Tensor:
    """The flow-map sampler (DISTILLERS.md §0.4): x ← x + (t_{k+1} − t_k)·u(x, t_k, t_{k+1}) over ``grid``.

    flow_map: ``u(x, s, t, cond, drop_cond)`` (e.g. :class:`FlowMapNet`); x0 (B, ...) at grid[0]; grid (K+1,)
    increasing times shared by the batch, K ≥ 1 (K = steps = NFE). ``cfg_scale`` ≠ 1 guides the average velocity
    as the teacher's field, u_u + w (u_c − u_u) (one fused 2B batch unless ``fused=False``); flow-map students are
    sampled with w = 1. Returns x at grid[-1], shape of x0.
    """
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"the flow-map sampler needs a grid (K+1,) with K >= 1 steps, got shape {tuple(grid.shape)}")
    grid = grid.to(device=x0.device, dtype=x0.dtype)
    if bool((grid[1:] < grid[:-1]).any()):
        raise ValueError(f"the flow-map sampler jumps forward in time (s <= t): grid {grid.tolist()} decreases")
    x = x0
    for k in range(grid.shape[0] - 1):
        u = guided(_to_target(flow_map, grid[k + 1]), cfg_scale, fused=fused)(x, grid[k].expand(x.shape[0]), cond)
        x = x + expand_time((grid[k + 1] - grid[k]).expand(x.shape[0]), x) * u
    return x


def _to_target(flow_map: Callable[..., torch.Tensor], t: torch.Tensor) -> Callable[..., torch.Tensor]:
    """u(·, ·, t) as a velocity net ``net(x, s, cond, drop_cond)`` for :func:`guided` (a 0-d t expands to any batch,
    including guidance's 2B)."""
    def net(x, s, cond=None, drop_cond=None):
        return flow_map(x, s, t, cond, drop_cond=drop_cond)
    return net
