"""Inference snapshots: the small file that evaluation, benchmarks, the viewer and the next training stage load.

Every training stage writes ``<work_dir>/snapshot.pt`` next to its full checkpoints (which stay for resuming):
the (EMA) weights of exactly the networks inference needs, their constructor specs, the sampler settings,
the latent scale, the GridSpec, the training data's horizons and pooling, and the resolved training config.
Loading an MFD student loads one VAE and one network: no teacher, aux flow or optimiser state.

A *description* is a snapshot without weights (``Snapshot.describe()``): a later stage stores it in its own
config in place of the snapshot's path, so its checkpoints rebuild without the earlier stage's files (the
weights are in that stage's own state_dict anyway).

File format (``torch.save`` of plain containers, loadable with ``weights_only=True``)::

    format "occ_mfd.snapshot/1" · kind ("vae" or one of FORECASTER_KINDS) · networks {name: {class, kwargs}}
    · weights {name: state_dict} · latent_scale · sampler {steps, shift, cfg_scale} · grid · data
    {pool, past, future} · step · config (text) · git_rev
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from occ_mfd.atomic import atomic_path
from occ_mfd.builder import build
from occ_mfd.models.codec import LatentCodec
from occ_mfd.models.pipeline import OccForecastPipeline, SamplerSettings

FORMAT = "occ_mfd.snapshot/1"
SNAPSHOT = "snapshot.pt"
#: Kinds whose "net" is a two-time flow map behind ``models.flow_map.FlowMapEndpoint`` (an interval input (s, t)).
FLOW_MAP_KINDS = ("ayf", "meanflow", "smf", "tvm", "freeflow")
FORECASTER_KINDS = ("teacher", "student", "vsd", "dmd2", "cd", "senseflow") + FLOW_MAP_KINDS


def network_spec(module: nn.Module) -> dict:
    """``{"class": dotted class, "kwargs": constructor kwargs}`` of a network that records ``init_kwargs``.

    Not a ``type=`` config dict on purpose: a description stored inside a later stage's objective config must
    stay data, and the config builder turns every nested dict with a ``type`` key into an object."""
    kwargs = getattr(module, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise TypeError(f"{type(module).__name__} records no init_kwargs, so it cannot be rebuilt from a snapshot")
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": dict(kwargs)}


@dataclass
class InferenceParts:
    """What an objective hands the engine for a snapshot: the *live* modules (the engine swaps in their EMA
    weights where it keeps one), the snapshot kind, and for forecasters the latent scale and sampler."""

    kind: str
    modules: dict[str, nn.Module]
    latent_scale: float | None = None
    sampler: SamplerSettings | None = None


@dataclass
class Snapshot:
    """An inference snapshot (see the module docstring). ``weights`` is None in a description."""

    kind: str
    networks: dict[str, dict]
    weights: dict[str, dict] | None = None
    latent_scale: float | None = None
    sampler: SamplerSettings | None = None
    grid: dict | None = None
    data: dict = field(default_factory=dict)
    step: int = 0
    config: str = ""
    git_rev: str = "unknown"
    path: str = ""

    # ------------------------------------------------------------------------------------ building
    def build(self, name: str) -> nn.Module:
        """Network ``name`` with its weights (random init for a description), eval mode, frozen."""
        if name not in self.networks:
            raise KeyError(f"snapshot {self.path or '(description)'} ({self.kind}) has no network {name!r} "
                           f"(it has {sorted(self.networks)})")
        spec = self.networks[name]
        module = build({"type": spec["class"], **spec["kwargs"]})
        if self.weights is not None:
            module.load_state_dict(self.weights[name])
        return module.eval().requires_grad_(False)

    def codec(self, cache_mb: float = 0.0) -> LatentCodec:
        """The frozen VAE at this snapshot's latent scale; ``cache_mb``: a latent cache (training stages)."""
        if self.latent_scale is None:
            raise ValueError(f"snapshot {self.path or '(description)'} ({self.kind}) has no latent scale: "
                             f"it is not a forecaster")
        return LatentCodec(self.build("vae"), scale=self.latent_scale, cache_mb=cache_mb, refiner=self.refiner())

    def refiner(self):
        """The decoder's ego-motion-prior refiner (:mod:`models.prior_refiner`), or None when the VAE has none."""
        return self.build("refiner") if "refiner" in self.networks else None

    def pipeline(self) -> OccForecastPipeline:
        """The forecaster this snapshot describes (teacher at its sampler, or a one-step student)."""
        self.require_forecaster()
        return OccForecastPipeline(self.codec(), self.build("net"), self.sampler)

    def require_forecaster(self) -> None:
        if self.kind not in FORECASTER_KINDS:
            raise ValueError(f"snapshot {self.path}: kind {self.kind!r} is not a forecaster "
                             f"({', '.join(FORECASTER_KINDS)}); a VAE snapshot feeds the teacher stage")

    # ------------------------------------------------------------------------------ (de)serialising
    def describe(self) -> dict:
        """The architecture without weights: what a later stage's config stores instead of this file's path."""
        return {"kind": self.kind, "networks": self.networks, "latent_scale": self.latent_scale,
                "sampler": self.sampler.to_dict() if self.sampler else None, "grid": self.grid,
                "data": dict(self.data)}

    @classmethod
    def from_description(cls, d: dict) -> "Snapshot":
        sampler = d.get("sampler")
        return cls(kind=d["kind"], networks={k: dict(v) for k, v in d["networks"].items()},
                   latent_scale=d.get("latent_scale"), sampler=SamplerSettings(**sampler) if sampler else None,
                   grid=d.get("grid"), data=dict(d.get("data") or {}))

    def to_state(self) -> dict:
        if self.weights is None:
            raise ValueError("a description (no weights) is not saved as a snapshot file")
        return {"format": FORMAT, **self.describe(), "weights": self.weights, "step": int(self.step),
                "config": self.config, "git_rev": self.git_rev}


def snapshot_from_parts(parts: InferenceParts, state_of: Callable[[nn.Module], dict] | None = None,
                        **meta) -> Snapshot:
    """A snapshot of ``parts``; ``state_of(module)`` gives the weights to store (default: the live ones; the
    engine passes the EMA's); ``meta``: the other :class:`Snapshot` fields (grid, data, step, config, git_rev)."""
    state_of = state_of or (lambda m: m.state_dict())
    weights = {name: {k: v.detach().cpu() for k, v in state_of(m).items()} for name, m in parts.modules.items()}
    return Snapshot(kind=parts.kind, networks={name: network_spec(m) for name, m in parts.modules.items()},
                    weights=weights, latent_scale=parts.latent_scale, sampler=parts.sampler, **meta)


def save_snapshot(snapshot: Snapshot, path: str | os.PathLike) -> Path:
    """Write atomically (temp file + rename): a reader sees the old snapshot or the new one, never half."""
    with atomic_path(path) as tmp:
        torch.save(snapshot.to_state(), tmp)
    return Path(path)


def snapshot_path(path: str | os.PathLike) -> Path:
    """A snapshot file, or a stage's work dir (→ its ``snapshot.pt``)."""
    path = Path(path)
    return path / SNAPSHOT if path.is_dir() else path


def load_snapshot(path: str | os.PathLike, map_location="cpu") -> Snapshot:
    """Load with ``weights_only=True``. Clear errors name the file: missing, unreadable, or not a snapshot
    (a full training checkpoint is pointed at the snapshot next to it)."""
    path = snapshot_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {path} does not exist (every training stage writes "
                                f"<work_dir>/{SNAPSHOT} with its checkpoints)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"snapshot {path}: cannot be loaded with weights_only=True: {e}") from e
    fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
    if fmt != FORMAT:
        hint = (f"; it is a training checkpoint: load {path.with_name(SNAPSHOT)} (the stage's inference "
                f"snapshot) instead" if isinstance(fmt, str) and fmt.startswith("occ_mfd.ckpt") else "")
        raise ValueError(f"{path}: not an occ_mfd inference snapshot (format {fmt!r}, expected {FORMAT!r}){hint}")
    snap = Snapshot.from_description(state)
    snap.weights, snap.step, snap.config = state["weights"], int(state["step"]), str(state["config"])
    snap.git_rev, snap.path = str(state.get("git_rev", "unknown")), str(path)
    return snap


def snapshot_or_description(path: str | os.PathLike | None, description: dict | None, what: str,
                            kinds: tuple[str, ...]) -> tuple[Snapshot, dict | None]:
    """For an objective that starts from an earlier stage: ``(snapshot, its description or None)`` from exactly
    one of a snapshot path or a stored description; the description is returned only for the path case (it
    is what the objective's own checkpoints store instead of the path)."""
    if (path is None) == (description is None):
        raise ValueError(f"give exactly one of {what}_snapshot (the {what} stage's snapshot.pt) or {what} "
                         f"(a stored description)")
    if path is not None:
        snap = load_snapshot(path)
        out = snap.describe()
    else:
        snap, out = Snapshot.from_description(description), None
    if snap.kind not in kinds:
        raise ValueError(f"{what} snapshot {snap.path or '(description)'}: kind {snap.kind!r}, expected "
                         f"{' or '.join(kinds)}")
    return snap, out
