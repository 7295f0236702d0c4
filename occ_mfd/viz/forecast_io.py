"""Forecast dumps: one ``.npz`` per sequence, written by ``tools/eval.py --dump-forecasts DIR`` and opened
by ``visualize/view.py --forecast FILE``.

Keys (all plain arrays, loadable with ``allow_pickle=False``):

=============  ===================  ==============================================================
``past``       (P, X, Y, Z) uint8   observed history, oldest first (``past[-1]`` = current frame)
``future_gt``  (F, X, Y, Z) uint8   ground-truth future
``pred``       (F, X, Y, Z) uint8   predicted future (Occ3D ids, 17 = free)
``ego``        (P+F, 4, 4) float32  each frame's ego pose in the current frame's ego frame
``grid``       str                  ``json.dumps(GridSpec.to_dict())``
``name``       str                  what produced ``pred`` (e.g. "student@1", "copy-last")
``scene``      str                  scene name
``tokens``     (P+F,) str           sample tokens in time order (may be empty)
=============  ===================  ==============================================================
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occ_mfd.atomic import atomic_path
from occ_mfd.data.occ3d import read_npz
from occ_mfd.grid import NUM_CLASSES, GridSpec

FORECAST_KEYS = ("past", "future_gt", "pred", "ego", "grid", "name", "scene", "tokens")


@dataclass
class ForecastRecord:
    """One sequence to look at. ``pred`` is None for a plain ground-truth sequence (nothing forecast).

    Shapes: past (P, X, Y, Z) uint8, future_gt (F, X, Y, Z) uint8, pred (F, X, Y, Z) uint8 or None,
    ego (P+F, 4, 4) float32, tokens P+F strings (or empty).
    """

    past: np.ndarray
    future_gt: np.ndarray
    pred: np.ndarray | None
    ego: np.ndarray
    grid: GridSpec
    name: str = ""
    scene: str = ""
    tokens: list[str] = field(default_factory=list)

    @property
    def num_past(self) -> int:
        return int(self.past.shape[0])

    @property
    def num_future(self) -> int:
        return int(self.future_gt.shape[0])


def validate_forecast(rec: ForecastRecord, where: str) -> ForecastRecord:
    """Raise ValueError naming ``where`` if shapes, dtypes or values are inconsistent; return ``rec``."""
    shape = tuple(rec.grid.shape)
    arrays = {"past": rec.past, "future_gt": rec.future_gt}
    if rec.pred is not None:
        arrays["pred"] = rec.pred
    for k, a in arrays.items():
        if a.dtype != np.uint8:
            raise ValueError(f"{where}: {k!r} has dtype {a.dtype}, expected uint8")
        if a.ndim != 4 or tuple(a.shape[1:]) != shape:
            raise ValueError(f"{where}: {k!r} has shape {tuple(a.shape)}, expected (T, {', '.join(map(str, shape))}) "
                             f"for grid {rec.grid.to_dict()}")
        if a.size and int(a.max()) >= NUM_CLASSES:
            raise ValueError(f"{where}: {k!r} holds label {int(a.max())}, expected Occ3D ids 0..{NUM_CLASSES - 1}")
    if rec.past.shape[0] < 1:
        raise ValueError(f"{where}: 'past' has no frames")
    if rec.pred is not None and rec.pred.shape != rec.future_gt.shape:
        raise ValueError(f"{where}: 'pred' {rec.pred.shape} and 'future_gt' {rec.future_gt.shape} differ")
    T = rec.num_past + rec.num_future
    if tuple(rec.ego.shape) != (T, 4, 4):
        raise ValueError(f"{where}: 'ego' has shape {tuple(rec.ego.shape)}, expected ({T}, 4, 4)")
    if rec.tokens and len(rec.tokens) != T:
        raise ValueError(f"{where}: 'tokens' has {len(rec.tokens)} entries, expected {T} (P+F) or none")
    return rec


def save_forecast(path: str | os.PathLike, past: np.ndarray, future_gt: np.ndarray, pred: np.ndarray,
                  ego: np.ndarray, grid: GridSpec, name: str = "", scene: str = "",
                  tokens: list[str] | tuple = ()) -> Path:
    """Validate and write one forecast dump atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    rec = ForecastRecord(np.asarray(past), np.asarray(future_gt), np.asarray(pred),
                         np.asarray(ego, dtype=np.float32), grid, str(name), str(scene), [str(t) for t in tokens])
    validate_forecast(rec, f"{path} (writing)")
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:  # a file object: no extra ".npz"
        np.savez_compressed(f, past=rec.past, future_gt=rec.future_gt, pred=rec.pred, ego=rec.ego,
                            grid=np.array(json.dumps(grid.to_dict())), name=np.array(rec.name),
                            scene=np.array(rec.scene), tokens=np.array(rec.tokens, dtype=str))
    return path


def load_forecast(path: str | os.PathLike) -> ForecastRecord:
    """Read and validate one dump. Raises FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    d = read_npz(path, "forecast file")
    missing = [k for k in FORECAST_KEYS if k not in d]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(d)}, expected {list(FORECAST_KEYS)}")
    try:
        grid = GridSpec.from_dict(json.loads(str(d["grid"])))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: 'grid' is not a GridSpec JSON string: {e}") from e
    rec = ForecastRecord(d["past"], d["future_gt"], d["pred"], d["ego"].astype(np.float32), grid,
                         str(d["name"]), str(d["scene"]), [str(t) for t in d["tokens"].reshape(-1)])
    return validate_forecast(rec, str(path))
