#!/usr/bin/env python
"""A study that can tell distillers apart: several seeds, enough updates to converge, the spread.

    python benchmarks/distill_study.py --suite toy --methods mfd vsd dmd2 mfd_coupled vsd_max2 \
        --seeds 0 1 2 --updates 600 --out study.json --plot study.png

Suite ``toy`` (../shared/DISTILLERS.md §12 A): the ring of 8 Gaussians with its exact (closed-form) teacher
velocity; the student and the aux start from an MLP fitted to that velocity (1500 steps), the aux gets a
shared 300-step warm-up on the initial student's samples, then every method runs ``--updates`` student
updates at the shared aux:student ratio 4:1 (Adam lr 1e-3, batch 256), fresh noise everywhere.
Methods: ``mfd`` (h = 0.02), ``vsd`` (Diff-Instruct: s = t ~ U(0, 1)), ``dmd2`` (no GAN), and ablations
``mfd_coupled`` (x_s from the generator's own noise), ``vsd_max2`` (t = max of two uniforms), ``mfd_h<H>``.
Not yet here: suites ``cond`` (conditional toy) and ``occ`` (tiny occupancy), methods ``cd``, ``senseflow``,
``ayf`` — asking for them is an error that says so.

JSON: ``{"settings", "rows": [one per (suite, method, seed)], "summary": {method: {metric: [mean, std]}}}``;
row keys: suite, method, seed, updates, energy_distance, energy_distance_init, energy_distance_floor,
mode_recall, mode_tv, coupling_error, rel_grad_var_init, grad_var, grad_snr, ms_per_update, nfe_per_update,
curve ([[student updates, energy distance], ...]).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d import fit_teacher  # noqa: E402
from benchmarks.toy2d_gmm import ExactTeacher, GaussianMixture2D, energy_distance  # noqa: E402
from occ_mfd.atomic import atomic_write  # noqa: E402
from occ_mfd.flow.solver import euler_integrate  # noqa: E402
from occ_mfd.flow.time_sampling import time_grid  # noqa: E402
from occ_mfd.objectives.dmd2 import DistributionMatchingDistillation  # noqa: E402
from occ_mfd.objectives.mfd import MeanFlowDistillation  # noqa: E402

SUITES = {"toy"}
PLANNED_SUITES = {"cond", "occ"}
METHODS = ("mfd", "vsd", "dmd2", "mfd_coupled", "vsd_max2")
PLANNED_METHODS = ("cd", "senseflow", "ayf")
TOY = dict(fit_steps=1500, aux_warmup=300, batch=256, lr=1e-3, aux_steps=4, h=0.02, eval_n=2000, grad_reps=50,
           curve_every=100)


def check_method(name: str) -> None:
    if name in METHODS or re.fullmatch(r"mfd_h\d*\.?\d+", name):
        return
    known = f"known: {', '.join(METHODS)}, mfd_h<H>"
    if name in PLANNED_METHODS:
        raise SystemExit(f"error: method {name!r} is planned, not implemented yet; {known}")
    raise SystemExit(f"error: unknown method {name!r}; {known}")


def make_objective(name: str, teacher, student, aux, cfg: dict):
    """The objective of method ``name`` on copies of the shared student and warmed-up aux."""
    prepare = lambda x_like: (x_like, None)  # noqa: E731 - unconditional toy: the batch is the sample shape
    kw = dict(cfg_scale=1.0, aux_steps=cfg["aux_steps"], student_steps=1)
    student, aux = copy.deepcopy(student), copy.deepcopy(aux)
    if name == "dmd2":
        return DistributionMatchingDistillation(teacher, student, aux, prepare, **kw)
    h = float(name[len("mfd_h"):]) if name.startswith("mfd_h") else cfg["h"]
    extra = {"mfd_coupled": dict(noise="coupled"), "vsd": dict(s_neq_t_ratio=0.0),
             "vsd_max2": dict(s_neq_t_ratio=0.0, vsd_time="max2")}.get(name, {})
    return MeanFlowDistillation(teacher, student, aux, prepare, max_substep=h, **kw, **extra)


@torch.no_grad()
def student_samples(obj, z):
    return obj.generate(z, None)


def mode_stats(x: torch.Tensor, gmm: GaussianMixture2D) -> tuple[float, float]:
    """(recall, TV): each sample goes to its nearest mode; a mode is recalled when it gets at least a quarter
    of its expected share; TV between the sample mode weights and the mixture weights."""
    k = torch.cdist(x.double(), gmm.means).argmin(1)
    w = torch.bincount(k, minlength=len(gmm.weights)).double() / len(x)
    return float((w >= 0.25 * gmm.weights).double().mean()), float(0.5 * (w - gmm.weights).abs().sum())


def relative_grad_variance(obj, batch: int, reps: int, seed: int) -> float:
    """tr Cov(g) / ||E g||² of the student gradient over ``reps`` batches at the current state."""
    gs = []
    for r in range(reps):
        torch.manual_seed(seed + 1000 + r)
        obj.student.zero_grad()
        obj(torch.zeros(batch, 2), "student").loss.backward()
        gs.append(torch.cat([p.grad.reshape(-1) for p in obj.param_groups()["student"]]))
    g = torch.stack(gs)
    return float(g.var(0).sum() / g.mean(0).pow(2).sum())


def run_toy(methods: list[str], seed: int, updates: int, cfg: dict, progress: bool) -> list[dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture2D.ring(k=8, radius=2.0, std=0.2)
    teacher = ExactTeacher(gmm)
    fit = fit_teacher(gmm, cfg["fit_steps"], cfg["batch"], cfg["lr"], gen, progress)
    # Shared aux warm-up on the initial student's samples (every method starts from this state).
    warm = MeanFlowDistillation(teacher, copy.deepcopy(fit), copy.deepcopy(fit), lambda x: (x, None))
    opt = torch.optim.Adam(warm.param_groups()["aux"], lr=cfg["lr"])
    for _ in range(cfg["aux_warmup"]):
        opt.zero_grad()
        warm(torch.zeros(cfg["batch"], 2), "aux").loss.backward()
        opt.step()
    target = gmm.sample(cfg["eval_n"], torch.Generator().manual_seed(seed + 7))
    z = torch.randn(cfg["eval_n"], 2, generator=torch.Generator().manual_seed(seed + 9))
    ode = euler_integrate(lambda x, t: gmm.velocity(x, t), z.clone(), time_grid(200, 3.0))   # Φ_T(z)
    floor = energy_distance(ode, target)
    rows = []
    for name in methods:
        obj = make_objective(name, teacher, warm.student, warm.aux, cfg)
        ed_init = energy_distance(student_samples(obj, z), target)
        rel_var = relative_grad_variance(obj, cfg["batch"], cfg["grad_reps"], seed)
        opts = {k: torch.optim.Adam(v, lr=cfg["lr"]) for k, v in obj.param_groups().items()}
        torch.manual_seed(seed + 1)
        curve, done, nfe, logs, t0 = [[0, ed_init]], 0, [], {}, time.perf_counter()
        steps = updates * (cfg["aux_steps"] + 1)
        for step in tqdm(range(steps), desc=f"{name} seed {seed}", disable=not progress, leave=False):
            ph = obj.phase(step)
            opts[ph].zero_grad()
            out = obj(torch.zeros(cfg["batch"], 2), ph)
            out.loss.backward()
            logs.update(obj.after_backward(ph))
            opts[ph].step()
            if ph == "student":
                done += 1
                nfe.append(float(out.logs["nfe_teacher"]) + float(out.logs["nfe_aux"]) + 1)
                if done % cfg["curve_every"] == 0:
                    curve.append([done, energy_distance(student_samples(obj, z), target)])
        seconds = time.perf_counter() - t0
        x = student_samples(obj, z)
        recall, tv = mode_stats(x, gmm)
        rows.append({"suite": "toy", "method": name, "seed": seed, "updates": done,
                     "energy_distance": energy_distance(x, target), "energy_distance_init": ed_init,
                     "energy_distance_floor": floor, "mode_recall": recall, "mode_tv": tv,
                     "coupling_error": float((x - ode).norm(dim=1).mean()), "rel_grad_var_init": rel_var,
                     "grad_var": logs.get("student_grad_var"), "grad_snr": logs.get("student_grad_snr"),
                     "ms_per_update": 1e3 * seconds / max(done, 1), "nfe_per_update": float(np.median(nfe)),
                     "curve": curve})
    return rows


SUMMARY_KEYS = ("energy_distance", "mode_recall", "mode_tv", "coupling_error", "rel_grad_var_init",
                "ms_per_update", "nfe_per_update")


def summarise(rows: list[dict]) -> dict:
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        out[m] = {k: [float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs]))] for k in SUMMARY_KEYS}
        out[m]["seeds"] = len(rs)
    return out


def plot(path: Path, rows: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        for j, r in enumerate(r for r in rows if r["method"] == m):
            u, ed = zip(*r["curve"])
            ax.plot(u, ed, color=f"C{i}", alpha=0.8, label=m if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("student updates")
    ax.set_ylabel("energy distance to the target")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", nargs="+", default=["toy"])
    ap.add_argument("--methods", nargs="+", default=["mfd", "vsd", "dmd2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates", type=int, default=600, help="student updates per method")
    ap.add_argument("--quick", action="store_true", help="small sizes (tests)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="study.json")
    ap.add_argument("--plot", help="PNG of energy distance vs student updates")
    a = ap.parse_args(argv)
    for s in a.suite:
        if s not in SUITES:
            why = "planned, not implemented yet" if s in PLANNED_SUITES else f"known: {', '.join(sorted(SUITES))}"
            raise SystemExit(f"error: suite {s!r}: {why}")
    for m in a.methods:
        check_method(m)
    torch.set_num_threads(a.threads)
    cfg = dict(TOY, **(dict(fit_steps=200, aux_warmup=50, eval_n=500, grad_reps=8, curve_every=10) if a.quick
                       else {}))
    rows = []
    for seed in a.seeds:
        rows += run_toy(a.methods, seed, a.updates, cfg, progress=not a.quick)
    res = {"settings": {**cfg, "updates": a.updates, "seeds": a.seeds, "aux_student_ratio": f"{cfg['aux_steps']}:1"},
           "rows": rows, "summary": summarise(rows)}
    atomic_write(Path(a.out), lambda f: f.write(json.dumps(res, indent=2)), binary=False)
    if a.plot:
        plot(Path(a.plot), rows)
    print(f"{'method':<14}" + "".join(f"{k:>22}" for k in ("energy_distance", "mode_recall", "rel_grad_var_init",
                                                             "ms_per_update", "nfe_per_update")))
    for m, s in res["summary"].items():
        print(f"{m:<14}" + "".join(f"{s[k][0]:>13.4g} ± {s[k][1]:<6.2g}" for k in
                                   ("energy_distance", "mode_recall", "rel_grad_var_init", "ms_per_update",
                                    "nfe_per_update")))
    print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    return 0 if all(math.isfinite(r["energy_distance"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
