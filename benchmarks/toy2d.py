"""Toy 2-D Mean Flow Distillation study (issue 5; MFD paper Sec. C.3 / Fig. 4).

Setting: target = ring of 8 Gaussians (benchmarks/toy2d_gmm.py, exact teacher velocity in closed form),
x0 ~ N(0, I). Pipeline, using the same objective class as the occupancy student
(:class:`occ_mfd.objectives.mfd.MeanFlowDistillation`):

1. "teacher fit": an MLP velocity regressed on the exact v*(x_t, t) (t ~ U). Student and aux are copies of
   it (the paper's initialisation); the student is G(x0) = x0 + f(x0, 0), i.e. the teacher-fit's one-step
   Euler jump (which collapses toward the mixture mean, like a 1-step teacher).
2. aux warm-up: ``--aux-warmup`` aux-only updates on the initial student's samples, so the aux tracks p_theta
   before the first student update (both methods start from this same state).
3. gradient variance at that state (same student params, frozen aux): for R repetitions, the same x0 batch
   and the same uniforms and fresh noise (common random numbers) give one MFD gradient (s = min, t = max) and
   one VSD gradient (Diff-Instruct: s = t = u1 ~ U(0, 1)); variance = trace of the gradient covariance over
   repetitions.
4. MFD and VSD training (Adam over ``param_groups()``, phase by ``phase(step)``), then energy distances of
   student samples to target samples, next to the floor: exact-ODE samples (many Euler steps) vs target.

Keys: ``grad_var_ratio_mfd_over_vsd`` (raw trace-of-covariance ratio, the paper's Fig. 4 quantity),
``grad_rel_var_*`` (variance / squared norm of the mean gradient: scale-free), ``*_at_s`` (the control that
evaluates instantaneous velocities at MFD's own x_s), ``after_training`` (the ratios again at the
MFD-trained state), ``energy_distance_{init_student,mfd,vsd,teacher_samples,target_resample}``.

Run: ``python benchmarks/toy2d.py --out toy2d.json`` (about a minute of CPU on one thread);
``--quick`` for the test (~11 s of CPU).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.toy2d_gmm import ExactTeacher, GaussianMixture2D, MLPVelocity, energy_distance  # noqa: E402
from occ_mfd.objectives.mfd import MeanFlowDistillation, variational_score_distillation  # noqa: E402
from occ_mfd.flow.solver import euler_integrate  # noqa: E402
from occ_mfd.flow.time_sampling import time_grid  # noqa: E402

FULL = dict(fit_steps=1500, aux_warmup=300, train_steps=3000, batch=256, grad_reps=200, eval_n=2000,
            aux_steps=4, student_steps=1, lr=1e-3, max_substep=0.02, grad_after_training=1)
QUICK = dict(fit_steps=300, aux_warmup=100, train_steps=800, batch=256, grad_reps=40, eval_n=1000,
             aux_steps=4, student_steps=1, lr=1e-3, max_substep=0.05, grad_after_training=0)


def fit_teacher(gmm, steps, batch, lr, gen, progress=True):
    """Regress an MLP on the exact velocity at random path points."""
    net = MLPVelocity()
    opt = torch.optim.Adam(net.parameters(), lr=lr * 2)
    for _ in tqdm(range(steps), desc="teacher fit", disable=not progress):
        x1 = gmm.sample(batch, gen)
        x0 = torch.randn(batch, 2, generator=gen)
        t = torch.rand(batch, generator=gen)
        xt = (1 - t[:, None]) * x0 + t[:, None] * x1
        loss = (net(xt, t) - gmm.velocity(xt, t)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def train(obj, steps, lr, batch, start_step=0, only=None, desc="train", progress=True):
    """Plain alternating loop: one Adam per param group, group chosen by obj.phase(step)."""
    opts = {k: torch.optim.Adam(v, lr=lr) for k, v in obj.param_groups().items()}
    x_like = torch.zeros(batch, 2)
    logs = {}
    for step in tqdm(range(start_step, start_step + steps), desc=desc, disable=not progress):
        ph = only or obj.phase(step)
        out = obj(x_like, ph)
        opts[ph].zero_grad()
        out.loss.backward()
        opts[ph].step()
        logs[ph] = {k: float(v) for k, v in out.logs.items()}
    return logs


def student_grad(obj, x_like):
    obj.student.zero_grad()
    obj(x_like, "student").loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in obj.param_groups()["student"]]).clone()


def vsd_at_s_grad(obj, x_like):
    """Control: instantaneous velocities at MFD's own x_s (s = t = min(u1, u2)), same RNG draws as forward()."""
    obj.student.zero_grad()
    x0 = torch.randn_like(x_like)
    x1 = obj.generate(x0, None)
    s, _ = obj.sample_interval(x_like.shape[0], x1.device, x1.dtype)
    n = torch.randn_like(x0) if obj.noise == "fresh" else x0
    obj.student_loss(x1, n, s, s, None)[0].backward()
    return torch.cat([p.grad.reshape(-1) for p in obj.param_groups()["student"]]).clone()


def gradient_variance(mfd, vsd, reps, batch, seed):
    """Trace of gradient covariance over repetitions with common random numbers (same x0, same uniforms).

    ``vsd``: the VSD objective (s = t = u1 ~ U(0, 1), as its phase draws them). ``vsd_at_s``: a control with
    s = t = min(u1, u2), i.e. MFD's own x_s, which separates the mean-flow effect from the dx_s/dtheta = s
    scale (VSD's x_t sits nearer the data, so its raw gradients are larger)."""
    x_like = torch.zeros(batch, 2)
    gm, gv, gs = [], [], []
    for r in range(reps):
        torch.manual_seed(seed + 1000 + r)
        gm.append(student_grad(mfd, x_like))
        torch.manual_seed(seed + 1000 + r)
        gv.append(student_grad(vsd, x_like))
        torch.manual_seed(seed + 1000 + r)
        gs.append(vsd_at_s_grad(mfd, x_like))
    out = {}
    for name, g in (("mfd", torch.stack(gm)), ("vsd", torch.stack(gv)), ("vsd_at_s", torch.stack(gs))):
        mean = g.mean(0)
        var = g.var(0).sum()
        out[f"grad_var_{name}"] = float(var)
        out[f"grad_mean_sq_norm_{name}"] = float(mean.pow(2).sum())
        out[f"grad_rel_var_{name}"] = float(var / mean.pow(2).sum())  # noise-to-signal (scale-free)
    out["grad_var_ratio_mfd_over_vsd"] = out["grad_var_mfd"] / out["grad_var_vsd"]
    out["grad_rel_var_ratio_mfd_over_vsd"] = out["grad_rel_var_mfd"] / out["grad_rel_var_vsd"]
    out["grad_var_ratio_mfd_over_vsd_at_s"] = out["grad_var_mfd"] / out["grad_var_vsd_at_s"]
    out["grad_rel_var_ratio_mfd_over_vsd_at_s"] = out["grad_rel_var_mfd"] / out["grad_rel_var_vsd_at_s"]
    return out


@torch.no_grad()
def student_samples(obj, n, seed):
    g = torch.Generator().manual_seed(seed)
    return obj.generate(torch.randn(n, 2, generator=g), None)


def run(cfg: dict, seed: int = 0, progress: bool = True) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture2D.ring(k=8, radius=2.0, std=0.2)
    teacher = ExactTeacher(gmm)
    fit = fit_teacher(gmm, cfg["fit_steps"], cfg["batch"], cfg["lr"], gen, progress)
    prepare = lambda x_like: (x_like, None)  # unconditional toy: the batch is just the sample shape
    kw = dict(cfg_scale=1.0, max_substep=cfg["max_substep"], aux_steps=cfg["aux_steps"],
              student_steps=cfg["student_steps"])
    mfd = MeanFlowDistillation(teacher, copy.deepcopy(fit), copy.deepcopy(fit), prepare, **kw)
    train(mfd, cfg["aux_warmup"], cfg["lr"], cfg["batch"], only="aux", desc="aux warm-up", progress=progress)
    # VSD starts from exactly the same student and warmed-up aux
    vsd = variational_score_distillation(teacher, copy.deepcopy(mfd.student), copy.deepcopy(mfd.aux), prepare, **kw)

    target = gmm.sample(cfg["eval_n"], torch.Generator().manual_seed(seed + 7))
    res = {"seed": seed, "settings": cfg, "target": "ring of 8 Gaussians, radius 2, std 0.2"}
    res["energy_distance_init_student"] = energy_distance(student_samples(mfd, cfg["eval_n"], seed + 9), target)
    res.update(gradient_variance(mfd, vsd, cfg["grad_reps"], cfg["batch"], seed))

    torch.manual_seed(seed + 1)
    logs_m = train(mfd, cfg["train_steps"], cfg["lr"], cfg["batch"], desc="MFD", progress=progress)
    torch.manual_seed(seed + 1)
    logs_v = train(vsd, cfg["train_steps"], cfg["lr"], cfg["batch"], desc="VSD", progress=progress)
    res["energy_distance_mfd"] = energy_distance(student_samples(mfd, cfg["eval_n"], seed + 9), target)
    res["energy_distance_vsd"] = energy_distance(student_samples(vsd, cfg["eval_n"], seed + 9), target)
    # the same measurement at the MFD-trained state (its student and aux for both estimators)
    if cfg["grad_after_training"]:
        vsd_t = variational_score_distillation(teacher, copy.deepcopy(mfd.student), copy.deepcopy(mfd.aux),
                                               prepare, **kw)
        gv_trained = gradient_variance(mfd, vsd_t, cfg["grad_reps"], cfg["batch"], seed + 5)
        res["after_training"] = {k: v for k, v in gv_trained.items() if "ratio" in k}
    res["final_mf_dist_mfd"] = logs_m.get("student", {}).get("mf_dist")
    res["final_mf_dist_vsd"] = logs_v.get("student", {}).get("mf_dist")

    # floor: the exact ODE, 200 Euler steps on a shifted grid, vs independent target samples
    x0 = torch.randn(cfg["eval_n"], 2, generator=torch.Generator().manual_seed(seed + 9))
    ode = euler_integrate(lambda x, t: gmm.velocity(x, t), x0, time_grid(200, 3.0))
    res["energy_distance_teacher_samples"] = energy_distance(ode, target)
    res["energy_distance_target_resample"] = energy_distance(
        gmm.sample(cfg["eval_n"], torch.Generator().manual_seed(seed + 11)), target)
    res["wall_s"] = time.time() - t0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="toy2d.json")
    ap.add_argument("--quick", action="store_true", help="small sizes for the test (~20 s)")
    ap.add_argument("--seed", type=int, default=0)
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    cfg.update({k: getattr(a, k) for k in FULL if getattr(a, k) is not None})
    res = run(cfg, a.seed)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, a.out)
    print(json.dumps({k: v for k, v in res.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
