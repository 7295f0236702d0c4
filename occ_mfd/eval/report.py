"""Evaluation output: the protocol header, the terminal table, JSON, CSV and the horizon plot.

JSON shape (IoU in %, NaN → null)::

    {"protocol": {...}, "rows": [{"name", "steps", "nfe", "iou": {"0.5": x, ..., "3.0": x}, "miou": {...},
     "iou_mean_123", "miou_mean_123", "iou_mean_all", "miou_mean_all", "per_class_iou": {...}, ...}]}

``*_mean_123`` is the OccWorld/DOME summary (mean of the 1 s, 2 s, 3 s frames), ``*_mean_all`` the OccFM
summary (mean of all future frames); ``per_class_iou`` is each class's IoU averaged over the frames where it
is defined (``per_class_iou_by_frame`` keeps every frame).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
from pathlib import Path

import torch

from occ_mfd.atomic import atomic_path, atomic_write
from occ_mfd.eval.runner import EvalRow
from occ_mfd.grid import FREE_ID, KEYFRAME_DT_S, OCC3D_CLASSES, GridSpec

ABSENT_RULE = "a class absent from both prediction and ground truth at a horizon is excluded (NaN, null in JSON)"
FREE_RULE = (f"free (id {FREE_ID}) is the negative class of IoU (occupied = any id ≠ {FREE_ID}) and is not "
             "in mIoU; mIoU = mean over classes 0-16 incl. 'others'")


def protocol_header(*, data_root, split: str | None, num_sequences: int, grid: GridSpec, past: int, future: int,
                    mask: str | None, seed: int, device, batch_size: int, models: list[dict],
                    frame_dt_s: float = KEYFRAME_DT_S, world_size: int = 1) -> dict:
    """Everything a reader needs to reproduce the table. ``models``: one dict per model row with name,
    snapshot, steps, sampler, shift, cfg_scale (see ``tools/eval.py``). ``world_size`` > 1 (torchrun) adds
    ``ranks`` and says that the rows' seconds are rank 0's (the metrics are those of the whole set)."""
    sharded = {"ranks": int(world_size),
               "sharding": "batch i on rank i mod ranks with its one-process noise seed; confusion matrices summed "
                           "over ranks (same table as one process); seconds: rank 0's share only"} \
        if world_size > 1 else {}
    return {
        "data_root": str(data_root), "split": split, "num_sequences": int(num_sequences),
        "grid": grid.to_dict(), "history_frames": past, "future_frames": future,
        "history_s": round(frame_dt_s * (past - 1), 3),
        "horizons_s": [round(frame_dt_s * (k + 1), 3) for k in range(future)],
        "classes": list(OCC3D_CLASSES[:FREE_ID]), "free_id": FREE_ID, "free_handling": FREE_RULE,
        "absent_class_rule": ABSENT_RULE, "mask": mask or "none",
        "summaries": {"mean_123": "OccWorld/DOME: mean of the 1 s, 2 s, 3 s frames",
                      "mean_all": "OccFM: mean of all future frames"},
        "models": models, "seed": int(seed), "noise": "CPU generator per batch seeded seed*1000003+batch_index",
        "batch_size": int(batch_size), "device": str(device), "torch": torch.__version__,
        "python": platform.python_version(), **sharded,
    }


def row_dict(row: EvalRow) -> dict:
    return {"name": row.name, "steps": row.steps, "nfe": row.nfe, **row.metrics.to_dict(),
            "seconds": round(row.seconds, 3), **{k: v for k, v in row.extra.items()}}


def results_dict(protocol: dict, rows: list[EvalRow]) -> dict:
    return {"protocol": protocol, "rows": [row_dict(r) for r in rows]}


def _clean(v):
    """NaN/inf → None, recursively (strict JSON)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_json(path: str | os.PathLike, results: dict) -> Path:
    text = json.dumps(_clean(results), indent=2, allow_nan=False)
    return atomic_write(Path(path), lambda f: f.write(text), binary=False)


def write_csv(path: str | os.PathLike, results: dict) -> Path:
    """One line per row: name, steps, nfe, iou@h, miou@h, the four means, per-class IoU (empty = NaN)."""
    rows = results["rows"]
    keys = list(rows[0]["iou"]) if rows else []
    classes = list(rows[0]["per_class_iou"]) if rows else []
    header = (["name", "steps", "nfe"] + [f"iou@{k}" for k in keys] + [f"miou@{k}" for k in keys]
              + ["iou_mean_123", "miou_mean_123", "iou_mean_all", "miou_mean_all"] + [f"iou_{c}" for c in classes])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    fmt = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"
    for r in rows:
        w.writerow([r["name"], r["steps"], r["nfe"]] + [fmt(r["iou"][k]) for k in keys]
                   + [fmt(r["miou"][k]) for k in keys]
                   + [fmt(r[k]) for k in ("iou_mean_123", "miou_mean_123", "iou_mean_all", "miou_mean_all")]
                   + [fmt(r["per_class_iou"][c]) for c in classes])
    text = buf.getvalue()
    return atomic_write(Path(path), lambda f: f.write(text), binary=False)


def format_header(protocol: dict) -> str:
    p = protocol
    g = p["grid"]
    lines = [
        "== evaluation protocol ==",
        f"data      {p['data_root']}  split={p['split'] or 'all'}  sequences={p['num_sequences']}",
        f"grid      lo={g['lo']} hi={g['hi']} voxel={g['voxel_size']} m shape={g['shape']}",
        f"time      history {p['history_frames']} frames ({p['history_s']} s), future {p['future_frames']} "
        f"frames at {', '.join(f'{h:g}' for h in p['horizons_s'])} s",
        f"classes   {len(p['classes'])} semantic ({', '.join(p['classes'])}) + free",
        f"free      {p['free_handling']}",
        f"absent    {p['absent_class_rule']}",
        f"mask      {p['mask']}",
    ]
    for m in p["models"]:
        lines.append(f"model     {m['name']}: {m.get('snapshot', '')}  sampler={m.get('sampler', 'euler')} "
                     f"shift α={m.get('shift')}  steps={m.get('steps')}  CFG={m.get('cfg_scale')}"
                     + (f"  decoder refiner={m['decoder_refiner']}" if m.get("decoder_refiner") else ""))
    lines.append(f"seed      {p['seed']} ({p['noise']})  batch={p['batch_size']}")
    lines.append(f"runtime   torch {p['torch']}  device={p['device']}  python {p['python']}"
                 + (f"  ranks={p['ranks']} (seconds: rank 0's share)" if p.get("ranks", 1) > 1 else ""))
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """IoU and mIoU (%) per future frame + both labelled summaries, one line per row."""
    rows = results["rows"]
    if not rows:
        return "(no rows)"
    keys = list(rows[0]["iou"])
    f = lambda v: "    -" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:5.1f}"
    name_w = max(8, *(len(r["name"]) for r in rows))
    out = []
    for metric in ("iou", "miou"):
        label = "IoU" if metric == "iou" else "mIoU"
        head = (f"{label:<{name_w}} steps  NFE | "
                + " ".join(f"{k + 's':>5}" for k in keys) + " | 1/2/3s(OccWorld/DOME) all(OccFM)")
        out += [head, "-" * len(head)]
        for r in rows:
            out.append(f"{r['name']:<{name_w}} {r['steps']:>5} {r['nfe']:>4} | "
                       + " ".join(f(r[metric][k]) for k in keys)
                       + f" | {f(r[metric + '_mean_123']):>21} {f(r[metric + '_mean_all']):>11}")
        out.append("")
    return "\n".join(out)


def plot_curves(path: str | os.PathLike, results: dict) -> Path:
    """IoU and mIoU against the horizon, one line per row.

    Drawn on a standalone ``matplotlib.figure.Figure`` (no pyplot): the process's matplotlib backend, which is
    the caller's business, is neither used nor changed."""
    from matplotlib.figure import Figure  # lazy: matplotlib costs ~0.3 s to import

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for r in results["rows"]:
        hs = [float(k) for k in r["iou"]]
        for ax, metric in zip(axes, ("iou", "miou")):
            ys = [math.nan if r[metric][k] is None else r[metric][k] for k in r[metric]]
            ax.plot(hs, ys, marker="o", label=f"{r['name']} ({r['steps']} steps)" if r["nfe"] else r["name"])
    for ax, title in zip(axes, ("IoU (%)", "mIoU (%)")):
        ax.set_xlabel("horizon (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=120)
    return path
