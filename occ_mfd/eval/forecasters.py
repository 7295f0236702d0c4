"""What the evaluation runner and the speed protocol call: a *forecaster* maps an ``OccBatch`` to future labels.

* :class:`Forecast`: ``classes`` (B, F, X, Y, Z) integer ids and the network evaluations used (``nfe``).
* :class:`PipelineForecaster`: an :class:`~occ_mfd.models.world_model.OccForecastPipeline` at fixed steps/CFG.
* :func:`load_forecaster`: any training checkpoint → ``(pipeline, ForecasterInfo)``. The objective is asked for
  ``objective.pipeline()``; objectives that lack it are handled by a small attribute fallback
  (``FlowMatchingObjective.net`` = teacher, ``MeanFlowDistillation.student`` = one-step student).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from occ_mfd.grid import GridSpec


@dataclass
class Forecast:
    """classes: (B, F, X, Y, Z) integer ids. nfe: network evaluations per sample (0 for baselines)."""

    classes: torch.Tensor
    nfe: int
    timings_ms: dict[str, float] = field(default_factory=dict)


class Forecaster(Protocol):
    name: str
    steps: int

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast: ...


@dataclass
class ForecasterInfo:
    """What a checkpoint says about its forecaster.

    kind: "teacher" | "student" | "vsd" (the default row name). grid: the checkpoint's (pooled) GridSpec or
    None. pool/past/future: the training data's. steps/shift/cfg_scale: the sampler defaults.
    via: "pipeline()" or "fallback" (how the pipeline was obtained). num_classes: the decoder's classes.
    """

    path: str
    kind: str
    grid: GridSpec | None
    pool: int = 1
    past: int = 4
    future: int = 6
    steps: int = 10
    shift: float = 3.0
    cfg_scale: float = 1.0
    num_classes: int | None = None
    via: str = "pipeline()"
    git_rev: str = "unknown"


class PipelineForecaster:
    """A pipeline at fixed ``steps`` and ``cfg_scale`` (None: the pipeline's own), named ``name``."""

    def __init__(self, pipeline, name: str, steps: int, cfg_scale: float | None = None):
        self.pipeline, self.name, self.steps, self.cfg_scale = pipeline, name, int(steps), cfg_scale

    @property
    def shift(self) -> float:
        return float(self.pipeline.shift)

    @property
    def effective_cfg(self) -> float:
        return float(self.pipeline.cfg_scale if self.cfg_scale is None else self.cfg_scale)

    def __call__(self, batch, generator: torch.Generator | None = None) -> Forecast:
        out = self.pipeline.forecast(batch, steps=self.steps, generator=generator, cfg_scale=self.cfg_scale)
        return Forecast(classes=out.classes, nfe=int(out.nfe), timings_ms=dict(out.timings_ms))


def _find_codec(objective):
    """The LatentCodec an objective uses: ``objective.codec``, ``objective.prepare.codec`` (LatentPrepare) or a
    cell of a ``prepare`` closure."""
    from occ_mfd.models.world_model import LatentCodec

    prepare = getattr(objective, "prepare", None)
    for codec in (getattr(objective, "codec", None), getattr(prepare, "codec", None)):
        if isinstance(codec, LatentCodec):
            return codec
    for cell in getattr(prepare, "__closure__", None) or ():
        if isinstance(cell.cell_contents, LatentCodec):
            return cell.cell_contents
    return None


def _fallback_pipeline(objective, path: Path):
    """Build the pipeline from known attributes (until every objective provides ``pipeline()``)."""
    from occ_mfd.distill.mfd import MeanFlowDistillation
    from occ_mfd.flow.fm_objective import FlowMatchingObjective
    from occ_mfd.models.world_model import OccForecastPipeline

    codec = _find_codec(objective)
    if codec is None:
        raise ValueError(f"checkpoint {path}: objective {type(objective).__name__} has no pipeline() and no "
                         "LatentCodec (attribute 'codec' or inside 'prepare'); cannot evaluate it")
    if isinstance(objective, MeanFlowDistillation):
        if objective.student_time != 0.0:
            raise ValueError(f"checkpoint {path}: student_time={objective.student_time} ≠ 0 is not a 1-step "
                             "Euler jump from t = 0; the fallback cannot build its pipeline")
        kind = "vsd" if objective.r_not_equal_t_ratio == 0.0 else "student"
        # x1 = x0 + student(x0, 0, c): one Euler step on the uniform grid [0, 1], no guidance.
        return OccForecastPipeline(codec, objective.student, steps=1, shift=1.0, cfg_scale=1.0), kind
    if isinstance(objective, FlowMatchingObjective):
        # CFG only makes sense for a net trained with condition dropout.
        cfg = 2.0 if objective.cond_drop_prob > 0 else 1.0
        return OccForecastPipeline(codec, objective.net, steps=10, shift=3.0, cfg_scale=cfg), "teacher"
    raise ValueError(f"checkpoint {path}: objective {type(objective).__name__} is neither a flow-matching "
                     "teacher nor an MFD student and has no pipeline(); cannot evaluate it")


def load_forecaster(ckpt_path: str | os.PathLike, use_ema: bool = True, device: str | torch.device = "cpu"):
    """Checkpoint → ``(OccForecastPipeline on device, ForecasterInfo)``.

    Raises FileNotFoundError for a missing file and ValueError naming the file for anything unusable.
    """
    from occ_mfd.engine.checkpoint import build_objective_from_checkpoint, load_checkpoint, \
        load_config_from_checkpoint

    path = Path(ckpt_path)
    ckpt = load_checkpoint(path)
    cfg = load_config_from_checkpoint(ckpt)
    objective = build_objective_from_checkpoint(path, use_ema=use_ema)
    if hasattr(objective, "pipeline"):
        pipeline, via = objective.pipeline(), "pipeline()"
        kind = getattr(objective, "forecaster_kind", None) or _kind_of(objective)
    else:
        (pipeline, kind), via = _fallback_pipeline(objective, path), "fallback"
    data = dict(cfg.get("data", None) or {})
    codec = pipeline.codec
    info = ForecasterInfo(
        path=str(path), kind=kind, grid=GridSpec.from_dict(ckpt["grid"]) if ckpt.get("grid") else None,
        pool=int(data.get("pool", 1)), past=int(data.get("past", 4)), future=int(data.get("future", 6)),
        steps=int(pipeline.steps), shift=float(pipeline.shift), cfg_scale=float(pipeline.cfg_scale),
        num_classes=getattr(getattr(codec, "vae", None), "num_classes", None), via=via,
        git_rev=str(ckpt.get("git_rev", "unknown")))
    return pipeline.to(device).eval(), info


def _kind_of(objective) -> str:
    from occ_mfd.distill.mfd import MeanFlowDistillation

    if isinstance(objective, MeanFlowDistillation):
        return "vsd" if objective.r_not_equal_t_ratio == 0.0 else "student"
    return "teacher"


def check_compatible(info: ForecasterInfo, data_grid: GridSpec, data_classes: list[str], data_root, past: int,
                     future: int) -> None:
    """Raise ValueError naming the checkpoint and the data when grids, classes or horizons disagree."""
    if info.grid is not None and info.grid != data_grid:
        try:
            data_grid.check_same(info.grid, f"checkpoint {info.path} vs data {data_root}")
        except ValueError as e:
            raise ValueError(f"{e} (data grid after pool={info.pool}: {data_grid.to_dict()}; checkpoint grid: "
                             f"{info.grid.to_dict()})") from None
    if info.num_classes is not None and info.num_classes != len(data_classes):
        raise ValueError(f"checkpoint {info.path}: its decoder has {info.num_classes} classes but data "
                         f"{data_root} has {len(data_classes)} ({data_classes})")
    if (info.past, info.future) != (past, future):
        raise ValueError(f"checkpoint {info.path}: trained with past={info.past}, future={info.future}; "
                         f"the evaluation uses past={past}, future={future} on {data_root}")


@dataclass
class ModelSpec:
    """One ``--model`` value: ``[NAME=]CKPT[:steps=N][,cfg=S]`` (None = the checkpoint's default)."""

    path: str
    name: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``[NAME=]CKPT[:steps=N][,cfg=S]``, e.g. ``teacher=runs/t/latest.pt:steps=4,cfg=1.5``."""
    name = None
    head, sep, opts = text.partition(":")
    if not sep:
        head, sep, opts = text.partition(",")
    if "=" in head:
        name, _, head = head.partition("=")
        if not name or not head:
            raise ValueError(f"--model {text!r}: expected [NAME=]CKPT[:steps=N][,cfg=S]")
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
