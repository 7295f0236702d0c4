"""What the evaluation runner and the speed protocol call: a *forecaster* maps an ``OccBatch`` to future labels.

* :class:`~occ_mfd.models.pipeline.Forecast`: ``classes`` (B, F, X, Y, Z) integer ids and ``nfe``.
* :class:`PipelineForecaster`: an :class:`~occ_mfd.models.pipeline.OccForecastPipeline` at fixed steps/CFG.
* :func:`load_forecaster`: a stage's inference snapshot → ``(pipeline, ForecasterInfo)``.
* :func:`check_compatible`: refuses a snapshot whose grid, classes, horizons — or vertical convention of its
  training labels (``occ_mfd.data.convention``) — differ from the evaluation data's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from occ_mfd.data.convention import check_conventions, folder_convention, snapshot_convention
from occ_mfd.grid import GridSpec
from occ_mfd.models.flow_map import is_flow_map
from occ_mfd.models.pipeline import Forecast, OccForecastPipeline
from occ_mfd.models.snapshot import FLOW_MAP_KINDS, load_snapshot


class Forecaster(Protocol):
    name: str
    steps: int

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast: ...


@dataclass
class ForecasterInfo:
    """What a snapshot says about its forecaster.

    kind: the snapshot's kind, one of ``models.snapshot.FORECASTER_KINDS`` (the default row name). grid: the snapshot's (pooled) GridSpec or
    None. pool/past/future: the training data's. steps/shift/cfg_scale: the sampler defaults.
    num_classes: the decoder's classes. step: training steps behind the weights. flow_map: the network is a
    two-time flow map behind its endpoint (``models.flow_map.FlowMapEndpoint``; steps = 1 samples it exactly).
    z_convention: the vertical convention of the labels it was trained on ("lidar"/"occ3d"), None when unknown
    (``occ_mfd.data.convention.snapshot_convention``).
    """

    path: str
    kind: str
    grid: GridSpec | None
    pool: int
    past: int
    future: int
    steps: int
    shift: float
    cfg_scale: float
    num_classes: int | None = None
    step: int = 0
    git_rev: str = "unknown"
    flow_map: bool = False
    z_convention: str | None = None


class PipelineForecaster:
    """A pipeline at fixed ``steps`` and ``cfg_scale`` (None: the pipeline's own), named ``name``."""

    def __init__(self, pipeline: OccForecastPipeline, name: str, steps: int, cfg_scale: float | None = None):
        self.pipeline, self.name, self.steps, self.cfg_scale = pipeline, name, int(steps), cfg_scale

    @property
    def shift(self) -> float:
        return float(self.pipeline.shift)

    @property
    def effective_cfg(self) -> float:
        return float(self.pipeline.cfg_scale if self.cfg_scale is None else self.cfg_scale)

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        return self.pipeline.forecast(batch, steps=self.steps, generator=generator, cfg_scale=self.cfg_scale)


def load_forecaster(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Inference snapshot (file or stage work dir) → ``(OccForecastPipeline on device, ForecasterInfo)``.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything unusable (e.g.
    a VAE snapshot, a full training checkpoint: its stage's snapshot.pt is named in the message, or a flow-map kind
    whose network has no interval input).
    """
    snap = load_snapshot(path)
    pipeline = snap.pipeline()
    flow_map = is_flow_map(pipeline.net)
    if snap.kind in FLOW_MAP_KINDS and not flow_map:
        raise ValueError(f"snapshot {snap.path}: kind {snap.kind!r} is a two-time flow-map student, but its network "
                         f"{type(pipeline.net).__name__} has no interval input (s, t); expected a "
                         f"models.flow_map.FlowMapEndpoint (a velocity snapshot, e.g. a teacher, is not a flow map)")
    info = ForecasterInfo(
        path=snap.path, kind=snap.kind, grid=GridSpec.from_dict(snap.grid) if snap.grid else None,
        pool=int(snap.data.get("pool", 1)), past=int(snap.data.get("past", 4)),
        future=int(snap.data.get("future", 6)), steps=pipeline.steps, shift=pipeline.shift,
        cfg_scale=pipeline.cfg_scale, num_classes=pipeline.codec.vae.num_classes, step=snap.step,
        git_rev=snap.git_rev, flow_map=flow_map,
        z_convention=snapshot_convention(snap.data, snap.git_rev, snap.config))
    return pipeline.to(device).eval(), info


def check_compatible(info: ForecasterInfo, data_grid: GridSpec, data_classes: list[str], data_root, past: int,
                     future: int, *, data_convention: str | None = None,
                     allow_convention_mismatch: bool = False) -> None:
    """Raise ValueError naming the snapshot and the data when grids, classes or horizons disagree, or when the
    snapshot's training labels and the data are of different vertical conventions (``data_convention``; None:
    read from ``data_root``'s index.json) unless ``allow_convention_mismatch``. An unknown side is not refused."""
    if info.grid is not None and info.grid != data_grid:
        try:
            data_grid.check_same(info.grid, f"snapshot {info.path} vs data {data_root}")
        except ValueError as e:
            raise ValueError(f"{e} (data grid after pool={info.pool}: {data_grid.to_dict()}; snapshot grid: "
                             f"{info.grid.to_dict()})") from None
    if info.num_classes is not None and info.num_classes != len(data_classes):
        raise ValueError(f"snapshot {info.path}: its decoder has {info.num_classes} classes but data "
                         f"{data_root} has {len(data_classes)} ({data_classes})")
    if (info.past, info.future) != (past, future):
        raise ValueError(f"snapshot {info.path}: trained with past={info.past}, future={info.future}; "
                         f"the evaluation uses past={past}, future={future} on {data_root}")
    if data_convention is None:
        try:
            data_convention = folder_convention(data_root)
        except (OSError, ValueError):
            data_convention = None
    check_conventions(getattr(info, "z_convention", None), data_convention,
                      f"snapshot {info.path} (trained on such labels)", f"ground truth {data_root}",
                      allow=allow_convention_mismatch)


@dataclass
class ModelSpec:
    """One ``--model`` value: ``[NAME=]SNAPSHOT[:steps=N][,cfg=S]`` (None = the snapshot's default)."""

    path: str
    name: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``[NAME=]SNAPSHOT[:steps=N][,cfg=S]``, e.g. ``teacher=runs/t/snapshot.pt:steps=4,cfg=1.5``."""
    name = None
    head, sep, opts = text.partition(":")
    if not sep:
        head, sep, opts = text.partition(",")
    if "=" in head:
        name, _, head = head.partition("=")
        if not name or not head:
            raise ValueError(f"--model {text!r}: expected [NAME=]SNAPSHOT[:steps=N][,cfg=S]")
    spec = ModelSpec(path=head, name=name)
    for item in filter(None, (o.strip() for o in opts.split(","))):
        key, eq, val = item.partition("=")
        try:
            if key == "steps" and eq:
                spec.steps = int(val)
            elif key == "cfg" and eq:
                spec.cfg_scale = float(val)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"--model {text!r}: bad option {item!r}; expected steps=N or cfg=S") from None
    if spec.steps is not None and spec.steps < 1:
        raise ValueError(f"--model {text!r}: steps must be ≥ 1")
    return spec
