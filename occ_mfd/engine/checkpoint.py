"""Atomic, self-describing training checkpoints.

A checkpoint (``work_dir/ckpt_{step:07d}.pt``, with ``latest.pt`` a hard link to the newest) is a dict of
tensors, plain containers and strings only, so it loads with ``torch.load(..., weights_only=True)``:

``format`` · ``step`` (updates done) · ``objective`` (state_dict of the unwrapped objective) ·
``optimizers`` (name → state_dict) · ``ema`` (:meth:`EMA.state_dict`, or None) · ``rng`` (one entry per
rank: torch, numpy, python and, with CUDA, every visible device's state) · ``loader`` (epoch / batch within
the epoch, informative: the position is a function of ``step``) · ``guard`` (non-finite counters) ·
``config`` (resolved config text) · ``grid`` (``GridSpec.to_dict()`` or None) · ``git_rev`` · ``torch_version``.

Checkpoints are written by step (``ckpt_interval``), by wall time (``ckpt_minutes``) and on a stop signal
(:mod:`occ_mfd.engine.preempt`); all are the same kind of file and ``keep`` counts them together.
:func:`find_resumable` picks what a run resumes from: ``latest.pt``, or, if it cannot be read (truncated,
corrupt, foreign), the newest kept ``ckpt_*.pt`` that can, saying so; never silently nothing.

Schedules are pure functions of the step (:mod:`occ_mfd.engine.schedule`) and bf16 autocast needs no
grad scaler, so neither has state to store.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config

from occ_mfd.atomic import atomic_path
from occ_mfd.builder import build

FORMAT = "occ_mfd.ckpt/1"
LATEST = "latest.pt"


class CheckpointUnreadable(RuntimeError):
    """A work dir holds checkpoints, but none of them can be loaded."""


def ckpt_name(step: int) -> str:
    return f"ckpt_{step:07d}.pt"


def git_revision(cwd: str | os.PathLike | None = None) -> str:
    """``git rev-parse HEAD`` of the source tree (of this file by default), or "unknown"."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _dotted(v):
    """Classes/functions → dotted import strings (the builder accepts both), recursively."""
    if isinstance(v, dict):
        return {k: _dotted(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_dotted(x) for x in v)
    if isinstance(v, type) or callable(v):
        return f"{v.__module__}.{v.__qualname__}"
    return v


def config_text(cfg: Config) -> str:
    """The resolved config as Python source that :func:`load_config_from_checkpoint` can parse
    (imported classes in new-style configs are written as dotted strings)."""
    plain = _dotted(cfg.to_dict())
    try:
        return Config(plain).pretty_text
    except Exception:  # pretty_text (yapf) can fail on exotic values; the repr still round-trips plain data
        return "\n".join(f"{k} = {v!r}" for k, v in plain.items())


# --------------------------------------------------------------------------------------------- RNG

def get_rng_state() -> dict:
    """RNG states of torch, numpy, python and, when CUDA is available, of every visible CUDA device
    (``"cuda"``: a list, index = device index) as checkpoint-safe values. Reading a CUDA generator's state
    (seed and offset, kept on the host) creates no context on the other devices."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> str | None:
    """Restore :func:`get_rng_state`'s output. CUDA: every device's state that this machine has (the first
    ``min(saved, visible)`` devices; a checkpoint from an older version holds one state, that of the then current
    device, restored to the current device). Returns a note when CUDA states could not all be restored (saved
    without CUDA and restored with it, or the other way round, or a different device count), else None."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    saved = state.get("cuda")
    if not torch.cuda.is_available():
        return "the checkpoint holds CUDA RNG states; CUDA is not available here" if saved is not None else None
    if saved is None:
        return "the checkpoint holds no CUDA RNG state (saved without CUDA); CUDA generators keep their seeds"
    if isinstance(saved, torch.Tensor):           # earlier checkpoints: the then current device's state
        torch.cuda.set_rng_state(saved)
        return None
    visible = torch.cuda.device_count()
    k = min(len(saved), visible)
    if k == len(saved) == visible:
        torch.cuda.set_rng_state_all(saved)
        return None
    for i in range(k):
        torch.cuda.set_rng_state(saved[i], i)
    return f"the checkpoint holds CUDA RNG states of {len(saved)} device(s), {visible} visible: restored {k}"


# -------------------------------------------------------------------------------------- save / load

def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: readers never see a
    partial file, and a failed save leaves no file behind."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _link_latest(path: Path) -> None:
    latest = path.with_name(LATEST)
    tmp = path.with_name(f".{LATEST}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)  # a hard link: no second copy on disk, survives pruning of old ckpts
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, latest)


def save_checkpoint(state: dict, work_dir: str | os.PathLike, keep: int = 3) -> Path:
    """Write ``state`` (must hold ``step``) as ``ckpt_{step}.pt``, point ``latest.pt`` at it, and keep
    only the newest ``keep`` step checkpoints (``keep <= 0``: keep all). Returns the path."""
    work_dir = Path(work_dir)
    path = work_dir / ckpt_name(int(state["step"]))
    atomic_save({"format": FORMAT, **state}, path)
    _link_latest(path)
    if keep > 0:
        for old in sorted(work_dir.glob("ckpt_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path}: cannot be loaded with weights_only=True: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: not an occ_mfd training checkpoint (format "
                         f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                         f"expected {FORMAT!r})")
    return ckpt


def find_resumable(work_dir: str | os.PathLike, warn=None) -> tuple[Path, dict] | None:
    """``(path, checkpoint)`` to resume ``work_dir`` from, or None if it holds no checkpoint at all.

    ``latest.pt`` first, then the kept ``ckpt_*.pt``, newest first; each one that cannot be loaded is
    reported through ``warn(message)`` with its path and the error. If checkpoints exist but none loads,
    raises :class:`CheckpointUnreadable` rather than letting the run start again from step 0."""
    work_dir = Path(work_dir)
    latest = work_dir / LATEST
    kept = sorted(work_dir.glob("ckpt_*.pt"), reverse=True)   # zero-padded step numbers: newest first
    candidates = ([latest] if latest.is_file() else []) + kept
    failed = []
    for i, path in enumerate(candidates):
        if i > 0 and latest.is_file() and _same_file(path, latest):
            continue                      # latest.pt is a hard link to it: the same bytes already failed
        try:
            ckpt = load_checkpoint(path)
        except (RuntimeError, ValueError) as e:
            failed.append(path)
            if warn is not None:
                warn(f"warning: cannot resume from {path}: {e}")
            continue
        if failed and warn is not None:
            warn(f"resuming from {path} instead (step {int(ckpt['step'])}), the newest checkpoint that loads")
        return path, ckpt
    if failed:
        raise CheckpointUnreadable(
            f"{work_dir}: no checkpoint can be loaded (tried {', '.join(str(p) for p in failed)}); refusing to "
            f"start again from step 0 over them: move them away, or start from scratch on purpose "
            f"(tools/train.py --no-resume)")
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_config_from_checkpoint(ckpt: dict | str | os.PathLike) -> Config:
    """The resolved training config stored in a checkpoint (a loaded dict or a path)."""
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    return Config.fromstring(ckpt["config"], ".py")


def build_objective_from_checkpoint(path: str | os.PathLike, use_ema: bool = True, map_location="cpu"):
    """Rebuild the objective from the checkpoint's own config and load its weights; with ``use_ema`` the
    EMA weights replace the live ones of every module in ``objective.ema_modules()``. Returned in eval
    mode on ``map_location``. For inference, load the stage's snapshot instead (``occ_mfd.models.snapshot``):
    this rebuilds the whole objective (an MFD one holds teacher, aux and student)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    cfg = load_config_from_checkpoint(ckpt)
    objective = build(cfg.objective)
    objective.load_state_dict(ckpt["objective"])
    if use_ema and ckpt.get("ema"):
        modules = objective.ema_modules()
        for name, sd in ckpt["ema"]["shadow"].items():
            if name not in modules:
                raise KeyError(f"checkpoint {path}: EMA module {name!r} not in objective.ema_modules() "
                               f"({sorted(modules)})")
            modules[name].load_state_dict(sd)
    return objective.to(map_location).eval()
