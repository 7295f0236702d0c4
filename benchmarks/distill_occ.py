"""Suite ``occ`` of ``benchmarks/distill_study.py``: every distiller on the tiny occupancy teacher.

../shared/DISTILLERS.md §12 C, with one deviation: a budget of *student updates* (``--updates``, the same for
every method, as the toy suites) instead of a wall-clock budget, so that the rows compare methods and not how
busy the machine was; the wall time per update is reported beside them. Each method trains with its
``configs/tiny/<method>.py`` through the real training loop (``occ_mfd.engine.loop.train``: the run resumes if it
is interrupted and run again), from the same teacher snapshot, at the shared aux:student ratio 4:1, with seed
``seed``; then ``tools/eval.py``'s runner scores its one-step EMA student on the first ``eval_sequences`` val
sequences (IoU / mIoU, mean of 1/2/3 s and of all horizons). Work dirs: ``<work>/<method>_s<seed>/``.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
from mmengine.config import Config

from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.engine.loop import train
from occ_mfd.eval.forecasters import PipelineForecaster, load_forecaster
from occ_mfd.eval.runner import run_eval
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.objectives.smf import StabilizedMeanFlow

REPO = Path(__file__).resolve().parents[1]
AUX_STEPS = 4                      # the shared aux:student ratio (DISTILLERS.md §12 fairness rules)

#: study method → (tiny config, objective overrides)
OCC_METHODS = {
    "mfd": ("mfd", {}), "vsd": ("vsd", {}), "dmd2": ("dmd2", {}), "senseflow": ("senseflow", {}), "cd": ("cd", {}),
    "ayf": ("ayf", {}), "mfd_coupled": ("mfd", {"noise": "coupled"}), "vsd_max2": ("vsd", {"vsd_time": "max2"}),
    "ayf_meanflow": ("ayf", {"time_sampler": "meanflow"}),
    "meanflow": ("meanflow", {}), "meanflow_official": ("meanflow", {"time_sampler": "meanflow"}),
    "tvm": ("tvm", {}), "freeflow": ("freeflow", {}), "freeflow_rw": ("freeflow", {"corrector_weighting": "r"}),
    "freeflow_vsd": ("freeflow", {"corrector_weighting": "r", "corrector_time": "uniform"}), "smf": ("smf", {}),
    "smf_no_warmup": ("smf", {"discrete_updates": 0}), "smf_no_align": ("smf", {"align_weight": 0.0}),
}
#: SMF's discrete warm-up K_w as a share of the study's update budget (DISTILLERS.md §8: 25 %).
SMF_WARMUP_FRAC = 0.25


def occ_method(name: str) -> tuple[str, dict]:
    """(config name, objective overrides) of a study method; ``mfd_h<H>`` sets MFD's sub-step bound h."""
    m = re.fullmatch(r"mfd_h(\d*\.?\d+)", name)
    if m:
        return "mfd", {"max_substep": float(m.group(1))}
    if name not in OCC_METHODS:
        raise ValueError(f"method {name!r} has no occupancy configuration (known: {', '.join(OCC_METHODS)}, mfd_h<H>)")
    return OCC_METHODS[name]


def method_config(name: str, seed: int, updates: int, data_root: str, teacher: str) -> Config:
    """The tiny config of ``name`` set up for the study: same teacher, data, seed, ratio and update budget."""
    cfg_name, overrides = occ_method(name)
    cfg = Config.fromfile(str(REPO / "configs" / "tiny" / f"{cfg_name}.py"))
    cfg.data.root = data_root
    cfg.data.update({k: v for k, v in load_snapshot(teacher).data.items() if k in ("pool", "past", "future")})
    cfg.objective.teacher_snapshot = teacher
    cfg.objective.update(overrides)
    has_aux = "aux_steps" in cfg.objective
    if has_aux:
        cfg.objective.aux_steps, cfg.objective.student_steps = AUX_STEPS, 1
    cfg.train.max_steps = updates * (AUX_STEPS + 1 if has_aux else 1)
    if cfg_name == "smf":
        # K_w from the budget; the loss-ratio switch off, so that the run's loop steps (phase A without aux, 20
        # aux-only updates at the switch, then 4:1) are exactly ``updates`` student updates
        if "discrete_updates" not in overrides:
            cfg.objective.discrete_updates = round(SMF_WARMUP_FRAC * updates)
        cfg.objective.switch_loss_ratio = 0.0
        o = cfg.objective
        align = o.get("align_weight", 1.0) > 0
        cfg.train.max_steps = StabilizedMeanFlow.loop_steps(updates, o.discrete_updates, AUX_STEPS, 1,
                                                            o.get("switch_aux_updates", 20), align)
        if not align:                                       # no alignment: no aux network, no aux optimiser
            cfg.optim.pop("aux", None)
    cfg.train.update(seed=seed, tensorboard=False, ckpt_interval=10**9, log_interval=AUX_STEPS + 1)
    return cfg


def student_log_stats(work_dir: Path) -> dict:
    """Median NFE per student update and the last gradient statistics, from the run's ``log.jsonl``."""
    rows = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    student = [r for r in rows if r.get("phase") == "student"]
    nfe = [sum(float(r.get(k, d)) for k, d in (("nfe_teacher", 0), ("nfe_aux", 0), ("nfe_student", 1),
                                               ("nfe_jvp", 0))) for r in student]
    last = student[-1] if student else {}
    return {"nfe_per_update": float(np.median(nfe)) if nfe else None,
            "grad_var": last.get("student_grad_var"), "grad_snr": last.get("student_grad_snr")}


def run_occ(methods: list[str], seed: int, updates: int, *, data_root: str, teacher: str, work: str,
            eval_sequences: int = 40, progress: bool = True) -> list[dict]:
    """One row per method: suite, method, seed, updates, iou/miou mean 1/2/3 s and all, ms_per_update,
    nfe_per_update, grad_var, grad_snr, work_dir."""
    d = load_snapshot(teacher).data                         # the teacher's windows and pooling
    val = OccSequenceDataset(data_root, split="val", past=int(d.get("past", 4)), future=int(d.get("future", 6)),
                             pool=int(d.get("pool", 1)), mask=None)
    rows = []
    for name in methods:
        work_dir = Path(work) / f"{name}_s{seed}"
        cfg = method_config(name, seed, updates, data_root, teacher)
        fresh = not (work_dir / "latest.pt").exists()
        t0 = time.perf_counter()
        result = train(cfg, work_dir, device="cpu")
        seconds = time.perf_counter() - t0
        if not result.finished:     # stopped by a signal: its checkpoint is written; scoring it would be wrong
            raise SystemExit(f"{name}: training stopped at step {result.step}/{cfg.train.max_steps} "
                             f"({result.stopped_by}); run the same command again to resume it")
        pipeline, _ = load_forecaster(work_dir)
        row = run_eval(val, [PipelineForecaster(pipeline, name, steps=1)], grid=val.grid, seed=seed,
                       max_sequences=eval_sequences, progress=progress)[0]
        m = row.metrics.to_dict()
        rows.append({"suite": "occ", "method": name, "seed": seed, "updates": updates,
                     "iou_mean_123": m["iou_mean_123"], "miou_mean_123": m["miou_mean_123"],
                     "iou_mean_all": m["iou_mean_all"], "miou_mean_all": m["miou_mean_all"],
                     # amortised over the aux updates; a resumed run's time covers only part: None, not a wrong number
                     "ms_per_update": 1e3 * seconds / updates if fresh else None,
                     **student_log_stats(work_dir), "work_dir": str(work_dir)})
    return rows
