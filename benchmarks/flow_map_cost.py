#!/usr/bin/env python
"""Cost per student update of the flow-map distillers, in forward-pass units F, on the tiny forecaster.

    OMP_NUM_THREADS=1 python benchmarks/flow_map_cost.py --runs 10 --out flow_map_cost.json

F = one no-grad forward of the flow-map student (the ``configs/tiny/occfm.py`` architecture, 8 × 25 × 25 latents,
4 past + 6 future frames) on a batch of ``--batch``; every other time is reported as ms and as a multiple of F
(DISTILLERS.md §0.7): the guided teacher (CFG 2, one fused 2B batch), the JVP (torch.func, no grad; with grad and
a backward; the central difference), and one update (forward + backward, no optimiser step) of each objective's
student phase, and of the aux phase where there is one. Random weights (the zero-initialised output gates
perturbed so that no branch is trivially zero): the time does not depend on their values. Medians of ``--runs``
after ``--warmup``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from occ_mfd.atomic import atomic_write  # noqa: E402
from occ_mfd.flow.guidance import guided  # noqa: E402
from occ_mfd.models.flow_map import flow_map_jvp  # noqa: E402
from occ_mfd.models.forecaster import ForecastCond, OccForecaster  # noqa: E402
from occ_mfd.objectives.ayf import AlignYourFlow, flow_map_student  # noqa: E402
from occ_mfd.objectives.freeflow import FreeFlow  # noqa: E402
from occ_mfd.objectives.meanflow import MeanFlow  # noqa: E402
from occ_mfd.objectives.mfd import MeanFlowDistillation  # noqa: E402
from occ_mfd.objectives.smf import StabilizedMeanFlow  # noqa: E402
from occ_mfd.objectives.tvm import TerminalVelocityMatching  # noqa: E402

#: configs/tiny/occfm.py's network
TINY_NET = dict(latent_channels=8, past=4, future=6, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attn_levels=(1,), heads=4, traj_mode="past")


def median_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def update(obj, batch, phase: str):
    """One forward + backward of ``phase`` (what the loop does before its optimiser step)."""
    def run():
        obj.zero_grad(set_to_none=True)
        obj(batch, phase).loss.backward()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=2, help="the tiny configs' batch size")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cfg", type=float, default=2.0, help="the teacher's guidance (the tiny teacher's: 2)")
    ap.add_argument("--h", type=float, default=0.1, help="the Euler sub-step of MFD and SMF's phase A (occupancy)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    net = OccForecaster(**TINY_NET, attn_backend="math")
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    B = a.batch
    x1 = torch.randn(B, 6, 8, 25, 25)
    cond = ForecastCond(torch.randn(B, 4, 8, 25, 25), torch.eye(4).expand(B, 10, 4, 4).clone())
    prepare = lambda batch: (x1, cond)  # noqa: E731
    teacher = net.eval().requires_grad_(False)
    fresh = lambda: flow_map_student(copy.deepcopy(net).requires_grad_(True))  # noqa: E731
    aux = lambda: copy.deepcopy(net).requires_grad_(True)  # noqa: E731
    runs, warm = a.runs, a.warmup
    student = fresh()
    fm = student.flow_map
    s, t = torch.full((B,), 0.2), torch.full((B,), 0.9)
    fn = lambda x_, s_, t_: fm(x_, s_, t_, cond)  # noqa: E731
    tangents = (torch.randn_like(x1), torch.ones(B), torch.zeros(B))

    def jvp_with_grad():
        fm.zero_grad(set_to_none=True)
        u, du = flow_map_jvp(fn, (x1, s, t), tangents, with_grad=True)
        (u.sum() + du.sum()).backward()

    with torch.no_grad():
        F = median_ms(lambda: fm(x1, s, t, cond), runs, warm)
        prims = {"teacher_guided": median_ms(lambda: guided(teacher, a.cfg)(x1, s, cond), runs, warm),
                 "jvp_func": median_ms(lambda: flow_map_jvp(fn, (x1, s, t), tangents), runs, warm),
                 "jvp_fd": median_ms(lambda: flow_map_jvp(fn, (x1, s, t), tangents, method="fd"), runs, warm)}
    prims["student_fwd_bwd"] = median_ms(update_fwd_bwd(fm, x1, s, t, cond), runs, warm)
    prims["jvp_func_with_grad_fwd_bwd"] = median_ms(jvp_with_grad, runs, warm)
    objectives = {
        "mfd": (MeanFlowDistillation(teacher, copy.deepcopy(net).requires_grad_(True), aux(), prepare,
                                     cfg_scale=a.cfg, max_substep=a.h), ("student", "aux")),
        "ayf": (AlignYourFlow(teacher, fresh(), prepare, cfg_scale=a.cfg, warmup_updates=0), ("student",)),
        "meanflow": (MeanFlow(teacher, fresh(), prepare, cfg_scale=a.cfg), ("student",)),
        "smf_phase_a": (StabilizedMeanFlow(teacher, fresh(), None, prepare, cfg_scale=a.cfg, align_weight=0.0,
                                           discrete_updates=10**9, switch_loss_ratio=0.0, max_substep=a.h),
                        ("student",)),
        "smf_phase_b": (StabilizedMeanFlow(teacher, fresh(), aux(), prepare, cfg_scale=a.cfg, discrete_updates=0,
                                           max_substep=a.h), ("student", "aux")),
        "tvm": (TerminalVelocityMatching(teacher, fresh(), prepare, cfg_scale=a.cfg), ("student",)),
        "freeflow": (FreeFlow(teacher, fresh(), aux(), prepare, cfg_scale=a.cfg), ("student", "aux")),
    }
    per_update = {}
    for name, (obj, phases) in objectives.items():
        for ph in phases:
            nfe = obj(None, ph).logs
            ms = median_ms(update(obj, None, ph), runs, warm)
            per_update[f"{name}_{ph}"] = {"ms": ms, "F": ms / F, **{k: float(v) for k, v in nfe.items()
                                                                     if k.startswith("nfe_")}}
    res = {"settings": {**vars(a), "net": TINY_NET, "latents": list(x1.shape), "torch": torch.__version__},
           "F_ms": F, "primitives": {k: {"ms": v, "F": v / F} for k, v in prims.items()}, "per_update": per_update}
    print(f"F = {F:.2f} ms (no-grad student forward, batch {B}, {a.threads} thread(s))")
    for k, v in res["primitives"].items():
        print(f"  {k:<30} {v['ms']:9.2f} ms  {v['F']:6.2f} F")
    for k, v in per_update.items():
        print(f"  {k:<30} {v['ms']:9.2f} ms  {v['F']:6.2f} F")
    if a.out:
        atomic_write(Path(a.out), lambda f: f.write(json.dumps(res, indent=2)), binary=False)
        print(f"wrote {a.out}")
    return 0


def update_fwd_bwd(fm, x, s, t, cond):
    def run():
        fm.zero_grad(set_to_none=True)
        fm(x, s, t, cond).sum().backward()
    return run


if __name__ == "__main__":
    sys.exit(main())
