"""Run forecasters ("rows": models at some steps, baselines) over a dataset into one OccMetrics per row.

Every row sees the same batches in the same order; the noise of batch ``i`` comes from a generator seeded
with ``seed * 1_000_003 + i`` and created afresh for each row, so a row's result depends only on the data,
the seed and the model — not on which other rows share the run nor on the batch position of other rows.

Under torchrun (a ``torch.distributed`` group exists) the batches are dealt to the ranks: batch ``i`` — the
same sequences as batch ``i`` of a one-process run — goes to rank ``i mod world_size`` and keeps its noise
seed, with no padding and no duplicates; the confusion matrices are then summed over the ranks, so every rank
returns the table of one process (tested). Timings (``EvalRow.seconds``) stay per rank: each rank's own
forecasts.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from occ_mfd.data.records import collate_sequences
from occ_mfd.engine import distributed as du
from occ_mfd.eval.forecasters import Forecaster
from occ_mfd.eval.metrics import MetricResult, OccMetrics
from occ_mfd.grid import FREE_ID, NUM_CLASSES, GridSpec
from occ_mfd.models.flow_map import is_flow_map
from occ_mfd.viz.forecast_io import save_forecast


@dataclass
class EvalRow:
    """One evaluated row. metrics: dataset-level scores (%). nfe: network evaluations per forecast (as the
    forecaster reported; 0 for baselines). seconds: wall time spent in this row's forecasts.
    extra: sampler settings for the report (shift, cfg_scale, checkpoint). Under torchrun, ``seconds`` is this
    rank's time on its own share of the batches; the metrics are those of the whole set."""

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


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, list[int]]]:
    """This rank's batches as (global batch index, dataset indices): global batch ``b`` holds sequences
    ``b·batch_size … (b+1)·batch_size - 1`` (the last one may be short), exactly the batches of one process;
    batch ``b`` goes to rank ``b mod world_size``. No padding, no duplicates: the shards partition the set."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_batches: batch_size={batch_size}, rank={rank}, world_size={world_size}")
    starts = range(0, n, batch_size)
    return [(b, list(range(s, min(s + batch_size, n)))) for b, s in enumerate(starts) if b % world_size == rank]


def run_eval(dataset: Dataset, rows: list[Forecaster], *, grid: GridSpec, batch_size: int = 1, seed: int = 0,
             device: str | torch.device = "cpu", max_sequences: int | None = None, num_workers: int = 0,
             dump_dir: str | os.PathLike | None = None, dump_count: int = 4, progress: bool = True,
             num_classes: int = NUM_CLASSES, free_id: int = FREE_ID) -> list[EvalRow]:
    """Evaluate ``rows`` on ``dataset`` (items: OccSequence). Returns one :class:`EvalRow` per row, in order.

    The batch's ``mask_future`` (from the dataset's ``mask``) restricts the counted voxels. With ``dump_dir``,
    the first ``dump_count`` sequences of each row are written with :func:`occ_mfd.viz.forecast_io.save_forecast`
    to ``dump_dir/<row name>@<steps>/<k>_<scene>.npz`` (under torchrun by the rank that forecast them).
    Under torchrun every rank must call this with the same arguments (see the module docstring).
    """
    if not rows:
        raise ValueError("run_eval: no rows to evaluate (give --model and/or --baseline)")
    keys = [(r.name, r.steps) for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError(f"run_eval: rows must differ in (name, steps), got {keys}")
    device = torch.device(device)
    if max_sequences is not None:
        dataset = Subset(dataset, range(min(int(max_sequences), len(dataset))))
    rank, world = (dist.get_rank(), dist.get_world_size()) if du.is_active() else (0, 1)
    mine = shard_batches(len(dataset), batch_size, rank, world)
    loader = DataLoader(dataset, batch_sampler=[idx for _, idx in mine], num_workers=num_workers,
                        collate_fn=collate_sequences)
    n_future = None
    metrics: list[OccMetrics] = []
    nfe = [0] * len(rows)
    seconds = [0.0] * len(rows)
    show = progress and rank == 0
    for (bi, idx), batch in zip(mine, tqdm(loader, desc=f"eval {len(rows)} row(s)", disable=not show)):
        batch = batch.to(device)
        if n_future is None:
            n_future = batch.future.shape[1]
            metrics = [OccMetrics(num_classes, free_id, horizons=n_future) for _ in rows]
        seen = idx[0]                                               # global index of the batch's first sequence
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
    if world > 1:
        # A rank may have had no batch (more ranks than batches): it learns the horizon count and the NFE from
        # the others. One collective for both; every rank takes the same branch below.
        agreed = du.all_reduce_max([float(n_future or 0)] + [float(v) for v in nfe])
        n_future, nfe = int(agreed[0]) or None, [int(v) for v in agreed[1:]]
        if n_future is not None and not metrics:
            metrics = [OccMetrics(num_classes, free_id, horizons=n_future) for _ in rows]
    if not metrics:
        raise ValueError("run_eval: the dataset yielded no sequences")
    out_rows = []
    for ri, row in enumerate(rows):
        metrics[ri].all_reduce()
        extra = {}
        if hasattr(row, "pipeline"):
            extra = {"sampler": "flow_map" if is_flow_map(row.pipeline.net) else "euler", "shift": float(row.shift),
                     "cfg_scale": float(row.effective_cfg)}
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
