"""Run forecasters ("rows": models at some steps, baselines) over a dataset into one OccMetrics per row.

Every row sees the same batches in the same order; the noise of batch ``i`` comes from a generator seeded
with ``seed * 1_000_003 + i`` and created afresh for each row, so a row's result depends only on the data,
the seed and the model — not on which other rows share the run nor on the batch position of other rows.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from occ_mfd.data.records import collate_sequences
from occ_mfd.eval.forecasters import Forecaster
from occ_mfd.eval.metrics import MetricResult, OccMetrics
from occ_mfd.grid import FREE_ID, NUM_CLASSES, GridSpec
from occ_mfd.viz.forecast_io import save_forecast


@dataclass
class EvalRow:
    """One evaluated row. metrics: dataset-level scores (%). nfe: network evaluations per forecast (as the
    forecaster reported; 0 for baselines). seconds: wall time spent in this row's forecasts.
    extra: sampler settings for the report (shift, cfg_scale, checkpoint)."""

    name: str
    steps: int
    nfe: int
    metrics: MetricResult
    seconds: float
    extra: dict = field(default_factory=dict)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The generator of batch ``batch_index``: one fixed stream per (seed, batch), whatever the row. A CPU
    generator (the pipeline draws on it, then moves the noise), so CPU and GPU runs see the same noise."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(batch_index))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=+-]+", "_", name)


def run_eval(dataset: Dataset, rows: list[Forecaster], *, grid: GridSpec, batch_size: int = 1, seed: int = 0,
             device: str | torch.device = "cpu", max_sequences: int | None = None, num_workers: int = 0,
             dump_dir: str | os.PathLike | None = None, dump_count: int = 4, progress: bool = True,
             num_classes: int = NUM_CLASSES, free_id: int = FREE_ID) -> list[EvalRow]:
    """Evaluate ``rows`` on ``dataset`` (items: OccSequence). Returns one :class:`EvalRow` per row, in order.

    The batch's ``mask_future`` (from the dataset's ``mask``) restricts the counted voxels. With ``dump_dir``,
    the first ``dump_count`` sequences of each row are written with :func:`occ_mfd.viz.forecast_io.save_forecast`
    to ``dump_dir/<row name>@<steps>/<k>_<scene>.npz``.
    """
    if not rows:
        raise ValueError("run_eval: no rows to evaluate (give --model and/or --baseline)")
    keys = [(r.name, r.steps) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"run_eval: rows must differ in (name, steps), got {keys}")
    device = torch.device(device)
    if max_sequences is not None:
        dataset = Subset(dataset, range(min(int(max_sequences), len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_sequences)
    n_future = None
    metrics: list[OccMetrics] = []
    nfe = [0] * len(rows)
    seconds = [0.0] * len(rows)
    seen = 0
    for bi, batch in enumerate(tqdm(loader, desc=f"eval {len(rows)} row(s)", disable=not progress)):
        batch = batch.to(device)
        if n_future is None:
            n_future = batch.future.shape[1]
            metrics = [OccMetrics(num_classes, free_id, horizons=n_future) for _ in rows]
        for ri, row in enumerate(rows):
            t0 = time.perf_counter()
            out = row(batch, generator=batch_generator(seed, bi))
            seconds[ri] += time.perf_counter() - t0
            nfe[ri] = int(out.nfe)
            pred = out.classes.long()                                                     # (B, F, X, Y, Z)
            metrics[ri].update(pred, batch.future, batch.mask_future)
            if dump_dir is not None and seen < dump_count:
                _dump(Path(dump_dir) / _safe(f"{row.name}@{row.steps}"), batch, pred, grid, row.name, seen,
                      dump_count)
        seen += batch.batch_size
    if not metrics:
        raise ValueError("run_eval: the dataset yielded no sequences")
    out_rows = []
    for ri, row in enumerate(rows):
        metrics[ri].all_reduce()
        extra = {}
        if hasattr(row, "pipeline"):
            extra = {"sampler": "euler", "shift": float(row.shift), "cfg_scale": float(row.effective_cfg)}
        out_rows.append(EvalRow(row.name, int(row.steps), nfe[ri], metrics[ri].compute(), seconds[ri], extra))
    return out_rows


def _dump(folder: Path, batch, pred: torch.Tensor, grid: GridSpec, name: str, first: int, count: int) -> None:
    for j in range(min(batch.batch_size, count - first)):
        k = first + j
        scene = batch.scenes[j] if batch.scenes else ""
        save_forecast(folder / f"{k:05d}_{_safe(scene)}.npz", batch.past[j].cpu().numpy().astype("uint8"),
                      batch.future[j].cpu().numpy().astype("uint8"), pred[j].cpu().numpy().astype("uint8"),
                      batch.ego[j].cpu().numpy(), grid, name=name, scene=scene,
                      tokens=batch.tokens[j] if batch.tokens else ())
