"""The training loop: one explicit loop (nanoGPT / EDM2 style) that trains any :class:`Objective`.

Config schema (mmengine pure-Python config; see ``configs/_base_/README.md``)::

    data = dict(type=..., ...)             # a torch Dataset (items collated by train.collate)
    objective = dict(type=..., ...)        # an Objective; may load earlier stages' snapshots by path
    optim = dict(main=dict(lr=2e-5, weight_decay=0.01, betas=(0.9, 0.999), grad_clip=5.0))
                                           # one entry per objective.param_groups(); may override
                                           # warmup_steps / schedule / min_lr_ratio per group
    train = dict(max_steps=..., batch_size=...  # per process (global batch = batch_size × world size)
                 , ...)                    # other keys: TRAIN_DEFAULTS below
    grid = dict(...)                       # optional GridSpec dict, stored if the dataset has no .grid

Per step: ``phase = objective.phase(step)``; zero the grads of every group; forward (bf16 autocast on
CUDA when ``amp="bf16"``); backward; clip the phase's group; if the loss and grad norm are finite on all
ranks, step the phase's AdamW and update the EMA of the modules that share parameters with that group,
else skip the update (the batch is consumed; ``max_nonfinite`` skips in a row stop the run).
``step`` counts batches, globally; checkpoints every ``ckpt_interval`` steps, after ``ckpt_minutes`` of wall
time since the last one (whichever comes first; None or 0: by steps only), at the end, and on a stop signal,
each with the stage's inference snapshot (``snapshot.pt``: the EMA weights of what
``objective.inference_parts()`` names). SIGTERM / SIGINT during training (:mod:`occ_mfd.engine.preempt`): the
current step finishes, a checkpoint is written, and ``train`` returns with ``stopped_by`` set; a second signal
exits at once. Resuming starts from ``latest.pt``, or from the newest kept checkpoint that loads if it cannot
be read (:func:`occ_mfd.engine.checkpoint.find_resumable`).
The loop never switches train/eval modes: the objective owns that (e.g. its frozen teacher stays in eval
mode). Messages go to this module's ``logging`` logger (rank 0 only); ``tools/train.py`` prints them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from torch.nn.parallel import DistributedDataParallel

from occ_mfd.builder import build, resolve_type, to_plain
from occ_mfd.data.convention import index_convention
from occ_mfd.engine import checkpoint as ck
from occ_mfd.engine import distributed as du
from occ_mfd.engine.data_loader import StepLoader
from occ_mfd.engine.ema import EMA
from occ_mfd.engine.logging import TrainLogger
from occ_mfd.engine.optim import build_optimizers, clip_grads, set_lr
from occ_mfd.engine.preempt import REPEAT_WINDOW_S, StopSignals, signal_name
from occ_mfd.grid import GridSpec
from occ_mfd.models.snapshot import SNAPSHOT, Snapshot, save_snapshot, snapshot_from_parts

log = logging.getLogger(__name__)

TRAIN_DEFAULTS = dict(
    max_steps=1000, batch_size=1, num_workers=0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.2,
    ema_decay=0.9999, amp=None, log_interval=10, ckpt_interval=1000, ckpt_minutes=30.0, keep_ckpts=3, seed=0,
    max_nonfinite=20,
    collate="occ_mfd.data.records.collate_sequences", tensorboard=True, find_unused_parameters=None,
)


class NonFiniteError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive non-finite steps."""


@dataclass
class TrainResult:
    step: int                    # steps done
    checkpoint: Path | None      # newest checkpoint written or resumed from
    finished: bool               # step == max_steps
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT" when a signal (on any rank) ended the run early


def train_config(cfg: Config) -> dict:
    """``cfg.train`` merged over :data:`TRAIN_DEFAULTS`; unknown keys are an error (typos)."""
    tc = to_plain(cfg.get("train", {}))
    bad = sorted(set(tc) - set(TRAIN_DEFAULTS))
    if bad:
        raise KeyError(f"config 'train': unknown keys {bad} (allowed: {sorted(TRAIN_DEFAULTS)})")
    tc = {**TRAIN_DEFAULTS, **tc}
    if tc["amp"] not in (None, "bf16"):
        raise ValueError(f"config train.amp must be None or 'bf16', got {tc['amp']!r}")
    return tc


def to_device(batch, device: torch.device):
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grid_dict(dataset, cfg: Config):
    grid = getattr(dataset, "grid", None)
    if grid is not None and hasattr(grid, "to_dict"):
        return grid.to_dict()
    return to_plain(cfg.get("grid")) if cfg.get("grid") is not None else None


def train(cfg: Config | dict, work_dir: str | os.PathLike, *, device: str | torch.device | None = None,
          resume: bool = True, clock: Callable[[], float] = time.monotonic) -> TrainResult:
    """Train ``cfg`` in ``work_dir``, resuming from ``work_dir/latest.pt`` when ``resume`` and it exists.
    Under torchrun (or in an existing process group) this process is one DDP rank. ``clock`` (seconds)
    times ``ckpt_minutes``; tests inject a fake one."""
    cfg = cfg if isinstance(cfg, Config) else Config(cfg)
    tc = train_config(cfg)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    # CUDA: set_device(cuda:LOCAL_RANK) before init_process_group(nccl, device_id=...), as torch documents.
    info = du.setup(device)
    device = info.device
    try:
        return _train(cfg, tc, Path(work_dir), device, info, resume, log.info if info.is_main else _mute, clock)
    finally:
        du.teardown(info)


def _mute(*args, **kwargs):
    pass


def _train(cfg, tc, work_dir, device, info, resume, say, clock) -> TrainResult:
    max_steps = int(tc["max_steps"])
    found = ck.find_resumable(work_dir, log.warning if info.is_main else _mute) if resume else None
    latest, ckpt = found if found is not None else (work_dir / ck.LATEST, None)
    if ckpt is not None and int(ckpt["step"]) >= max_steps:
        say(f"{work_dir}: training already finished (step {int(ckpt['step'])} >= max_steps {max_steps}); "
            f"nothing to do")
        if info.is_main and not (work_dir / SNAPSHOT).exists():
            _restore_snapshot(latest, ckpt, work_dir, say)
        return TrainResult(int(ckpt["step"]), latest, True)
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)

    _seed_all(int(tc["seed"]))  # same on every rank: identical initial weights
    dataset = build(cfg.data)
    objective = build(cfg.objective).to(device)
    optim_cfg = to_plain(cfg.get("optim", {}))
    opts = build_optimizers(objective, optim_cfg)
    groups = objective.param_groups()
    group_ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    ema_modules = objective.ema_modules()
    ema = EMA(ema_modules, tc["ema_decay"]) if ema_modules and tc["ema_decay"] else None
    # EMA modules to update after a step of group g: those sharing parameters with g.
    ema_of = {g: [n for n, m in ema_modules.items() if any(id(p) in ids for p in m.parameters())]
              for g, ids in group_ids.items()}

    # The config stored in checkpoints and snapshots: earlier stages' snapshot paths replaced by their
    # descriptions, so that a checkpoint rebuilds without the files it was trained from.
    cfg = _portable(cfg, objective)
    step, guard = 0, {"consecutive": 0, "skipped": 0}
    if ckpt is not None:
        objective.load_state_dict(ckpt["objective"])
        for name, opt in opts.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        step, guard = int(ckpt["step"]), dict(ckpt.get("guard", guard))
        rngs = ckpt["rng"]
        if len(rngs) == info.world_size:
            note = ck.set_rng_state(rngs[info.rank])
            if note:
                say(f"note: {note} (resumption is not bit-exact on CUDA)")
        else:
            say(f"note: checkpoint has RNG states of {len(rngs)} rank(s), this run has {info.world_size}; "
                f"reseeding (resumption is not bit-exact)")
            _seed_all(int(tc["seed"]) + 7919 * step + info.rank)
        if ck.config_text(cfg) != ckpt["config"]:
            say(f"note: the config differs from the one stored in {latest}; using the current one")
        say(f"resumed from {latest} at step {step}/{max_steps}")
    else:
        _seed_all(int(tc["seed"]) + 1 + info.rank)  # per-rank noise from here on

    model = objective
    if info.world_size > 1:
        # Each phase uses only its own group's parameters, so with several groups DDP must look for unused
        # ones (None: auto); a one-group objective that leaves some unused sets it True in its config.
        unused = tc["find_unused_parameters"]
        unused = len(groups) > 1 if unused is None else bool(unused)
        model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=unused)
    dataset_collate = getattr(dataset, "collate_fn", None)
    collate = dataset_collate or resolve_type(tc["collate"])
    loader = StepLoader(dataset, int(tc["batch_size"]), info.rank, info.world_size, int(tc["seed"]),
                        int(tc["num_workers"]), collate, pin_memory=device.type == "cuda")
    logger = TrainLogger(work_dir, max_steps, int(tc["batch_size"]) * info.world_size, info.is_main,
                         bool(tc["tensorboard"]))
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if tc["amp"] == "bf16" and device.type == "cuda"
           else contextlib.nullcontext())
    last_ckpt = latest if ckpt is not None else None
    grid = _grid_dict(dataset, cfg)
    # The vertical convention of the training labels goes into the snapshot, so eval can refuse data of the
    # other one (occ_mfd/data/convention.py); None when the dataset does not say.
    z_convention = index_convention(dataset.index) if hasattr(dataset, "index") else None
    _check_source_grid(objective, grid, cfg)
    writes_snapshot = objective.inference_parts() is not None
    # No model.train() here: modules are built in train mode, and objectives keep frozen networks (MFD's
    # teacher) in eval mode themselves; a blanket .train() would re-enable their dropout.
    ckpt_seconds = 60.0 * float(tc["ckpt_minutes"] or 0.0)
    last_save, stopped_by = clock(), None
    # Signal handlers only around the steps, restored afterwards (library code keeps no global state).
    with StopSignals() as stop, contextlib.closing(logger):
        while step < max_steps:
            batch = to_device(loader.batch(step), device)
            phase = objective.phase(step)
            if phase not in opts:
                raise KeyError(f"objective.phase({step}) = {phase!r} is not a param group ({sorted(opts)})")
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            lr = set_lr(opts[phase], optim_cfg[phase], tc, step)
            with amp:
                out = model(batch, phase)
            # Always backward (DDP expects it after every forward); decide afterwards whether to step.
            out.loss.backward()
            extra_logs = objective.after_backward(phase)
            loss = float(out.loss.detach().float())
            gnorm = clip_grads(groups[phase], optim_cfg[phase].get("grad_clip"))
            finite = math.isfinite(loss) and math.isfinite(gnorm)
            time_due = ckpt_seconds > 0 and clock() - last_save >= ckpt_seconds
            # One all_reduce(MAX) per step carries three decisions every rank must take together: skip the
            # update (any rank non-finite), stop (a signal reached any rank: torchrun and SLURM may signal
            # ranks at slightly different times, or only some), and save by wall time (clocks differ per
            # rank). Agreeing here, before the step ends, makes all ranks save the same step and leave the
            # loop together, with no extra collective and no rank left waiting in the next one.
            bad, signum, time_due = du.all_reduce_max([float(not finite), float(stop.signum), float(time_due)])
            ok, signum, time_due = bad == 0, int(signum), time_due > 0
            if ok:
                opts[phase].step()
                if ema is not None and ema_of[phase]:
                    ema.update(ema_of[phase])
                guard["consecutive"] = 0
            else:
                guard["consecutive"] += 1
                guard["skipped"] += 1
                say(f"step {step}: non-finite loss {loss} or grad norm {gnorm} in phase {phase!r}; update skipped "
                    f"({guard['consecutive']} in a row)")
                if guard["consecutive"] >= int(tc["max_nonfinite"]):
                    raise NonFiniteError(
                        f"stopping at step {step}: {guard['consecutive']} consecutive non-finite steps "
                        f"(max_nonfinite={tc['max_nonfinite']}); last good checkpoint: "
                        f"{last_ckpt if last_ckpt is not None else 'none (no checkpoint written yet)'}")
            step += 1
            scalars = {"loss": loss, "lr": lr, "grad_norm": gnorm, "skipped": float(not ok)}
            scalars.update({k: float(v) for k, v in out.logs.items()})
            scalars.update({k: float(v) for k, v in extra_logs.items()})
            logger.update(step, phase, scalars)
            if step % int(tc["log_interval"]) == 0 or step == max_steps:
                logger.flush(step)
            if signum and step < max_steps:
                say(f"{signal_name(signum)} received: step {step} done, writing a checkpoint before stopping "
                    f"(the same signal again, {REPEAT_WINDOW_S:g} s or more later, exits at once without one)")
            if step % int(tc["ckpt_interval"]) == 0 or step == max_steps or time_due or signum:
                last_ckpt = _save(work_dir, step, objective, opts, ema, guard, loader, cfg, grid, info, tc,
                                  z_convention)
                last_save = clock()
                why = "" if step % int(tc["ckpt_interval"]) == 0 or step == max_steps else (
                    f" (stop requested by {signal_name(signum)})" if signum else
                    f" ({tc['ckpt_minutes']} min since the last checkpoint)")
                say(f"saved {last_ckpt}" + (f" and {work_dir / SNAPSHOT}" if writes_snapshot else "") + why)
            if signum and step < max_steps:
                stopped_by = signal_name(signum)
                if step % int(tc["log_interval"]):
                    logger.flush(step)       # the steps since the last progress line are logged too
                say(f"stopped by {stopped_by} at step {step}/{max_steps}; checkpoint: {last_ckpt}. Run the same "
                    f"command again to resume from it")
                break
    return TrainResult(step, last_ckpt, step >= max_steps, stopped_by)


def _restore_snapshot(latest: Path, ckpt: dict, work_dir: Path, say) -> None:
    """A finished stage whose snapshot.pt is gone (deleted, or only latest.pt copied): write it again from the
    checkpoint's EMA weights, so the next stage and eval find it."""
    objective = ck.build_objective_from_checkpoint(latest, use_ema=True)   # EMA weights swapped in
    snapshot = _snapshot(objective, None, int(ckpt["step"]), ck.load_config_from_checkpoint(ckpt), ckpt.get("grid"),
                         str(ckpt.get("git_rev", "unknown")), ckpt.get("z_convention"))
    if snapshot is not None:
        say(f"wrote the missing {save_snapshot(snapshot, work_dir / SNAPSHOT)} from {latest}")


def _check_source_grid(objective, grid: dict | None, cfg: Config) -> None:
    """An earlier stage trained on another grid cannot read this data: say which files disagree, before training."""
    source = objective.source() if hasattr(objective, "source") else None
    if source is None or source[1] is None or grid is None:
        return
    data_root = to_plain(cfg.get("data", None) or {}).get("root", "the data")
    GridSpec.from_dict(grid).check_same(GridSpec.from_dict(source[1]), f"{source[0]} vs data {data_root}")


def _portable(cfg: Config, objective) -> Config:
    overrides = objective.portable_config() if hasattr(objective, "portable_config") else {}
    if not overrides:
        return cfg
    out = Config(cfg.to_dict())
    out.objective = {**to_plain(cfg.objective), **overrides}
    return out


def _save(work_dir, step, objective, opts, ema, guard, loader, cfg, grid, info, tc, z_convention=None) -> Path:
    rngs = du.all_gather_object(ck.get_rng_state())  # every rank's RNG, so a DDP resume is exact too
    path = work_dir / ck.ckpt_name(step)
    if info.is_main:
        epoch, b = loader.position(step)
        state = {"step": step, "objective": objective.state_dict(),
                 "optimizers": {n: o.state_dict() for n, o in opts.items()},
                 "ema": ema.state_dict() if ema is not None else None, "rng": rngs,
                 "loader": {"epoch": epoch, "batch_in_epoch": b, "batches_per_epoch": loader.batches_per_epoch},
                 "guard": dict(guard), "config": ck.config_text(cfg), "grid": grid,
                 "git_rev": ck.git_revision(), "torch_version": str(torch.__version__),
                 "world_size": info.world_size, "z_convention": z_convention}
        path = ck.save_checkpoint(state, work_dir, keep=int(tc["keep_ckpts"]))
        snapshot = _snapshot(objective, ema, step, cfg, grid, state["git_rev"], z_convention)
        if snapshot is not None:
            save_snapshot(snapshot, work_dir / SNAPSHOT)
    du.barrier()
    return path


def _snapshot(objective, ema, step, cfg, grid, git_rev, z_convention=None) -> Snapshot | None:
    """The inference snapshot: each module the objective names, with its EMA weights where the loop keeps an
    EMA of that very module, else its live weights (e.g. the frozen VAE, already an EMA of its own stage).
    ``z_convention``: the training labels' vertical convention, recorded in ``data`` when known."""
    parts = objective.inference_parts()
    if parts is None:
        return None
    ema_of = {id(m): ema.shadow[name] for name, m in ema.modules.items()} if ema is not None else {}
    data = to_plain(cfg.get("data", None) or {})
    return snapshot_from_parts(parts, lambda m: ema_of.get(id(m), m.state_dict()), grid=grid,
                               data={"pool": int(data.get("pool", 1)), "past": int(data.get("past", 4)),
                                     "future": int(data.get("future", 6)),
                                     **({"z_convention": z_convention} if z_convention else {})},
                               step=step, config=ck.config_text(cfg), git_rev=git_rev)
