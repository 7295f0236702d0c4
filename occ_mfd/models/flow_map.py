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
More pipeline steps are Euler on that endpoint field (a straight step toward each state's predicted endpoint),
not the flow map's own sampler x ← x + (t_{k+1} − t_k)·u(x, t_k, t_{k+1}).

:func:`flow_map_jvp` is the JVP the Eulerian objectives need (§0.6): ``torch.func.jvp`` under ``no_grad``, in fp32
(autocast off), with the math SDPA kernel (the flash / memory-efficient / CPU-flash kernels have no forward-mode
AD), or a central finite difference.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from occ_mfd.builder import build
from occ_mfd.models.embeddings import timestep_embedding
from occ_mfd.models.snapshot import network_spec

DT_PATHS = ("time_mlp", "fourier")
JVP_METHODS = ("func", "fd")


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


def is_flow_map(net: nn.Module) -> bool:
    """Whether ``net`` (a snapshot's "net") takes an interval input, i.e. is a flow map behind its endpoint."""
    return isinstance(net, FlowMapEndpoint)


def flow_map_jvp(fn: Callable[..., torch.Tensor], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                 method: str = "func", eps: float = 1e-4) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(fn(*primals) or None, d/dε fn(primals + ε·tangents) at ε = 0), without grad.

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
    with torch.no_grad(), torch.autocast(device_type=primals[0].device.type, enabled=False), \
            sdpa_kernel(SDPBackend.MATH):
        if method == "func":
            return torch.func.jvp(fn, primals, tangents)
        plus = fn(*(p + eps * v for p, v in zip(primals, tangents)))
        minus = fn(*(p - eps * v for p, v in zip(primals, tangents)))
        return None, (plus - minus) / (2 * eps)
