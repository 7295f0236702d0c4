#!/usr/bin/env python
"""The first run on a new GPU machine: one command that says what works and what it measured. Installs nothing,
downloads nothing, needs no data; about 10 minutes at most on one GPU.

    python tools/gpu_check.py [--out gpu_check.json]        # or: make gpu-check

CPU part (always): the installed spconv against torch; bf16 autocast on the CPU (a tiny teacher step and MFD
aux/student steps, with dtype checks); the spconv stem against its dense twin on the CPU.
CUDA part (when torch sees a GPU): the tests marked ``gpu`` (pytest -m gpu); bf16 teacher and MFD steps of the
full-size configs (configs/nuscenes/) with dtype checks; the spconv stem on CUDA, forward and backward, against the
dense twin at full size; a 1-process NCCL group through occ_mfd.engine.distributed (all_reduce, barrier,
all_gather_object, the metrics' all_reduce); torch.compile of the forecaster against eager; teacher@10 vs
student@1 speed (full-size configs, random weights, fp32 and bf16); peak memory of a full-size VAE step and teacher
step at the configs' batch sizes, and at batch 1 and 2: the per-sample slope gives the largest batch that fits a
24 GB card.

Without CUDA the CUDA part is skipped, and the output says so. ``--rehearse`` runs the CUDA part's code on this
machine's device with configs/tiny/ shrunk further: a check of the code, not of a GPU (the tests use it).

Output: a table, and ``--out`` (default gpu_check.json): {"machine": {...}, "cuda_part": "ran" | "skipped: …",
"items": {name: {"status": "pass" | "fail" | "skip", "seconds", "figures": {...}, "message"}}, "passed"}.
Exit status: 0 when no item failed, 1 when one did, 2 for bad arguments (e.g. --device cuda without a GPU).
Random weights are used throughout: the figures are speed, memory and numerics, not forecast quality.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from mmengine.config import Config

from occ_mfd.atomic import atomic_write
from occ_mfd.builder import build, to_plain
from occ_mfd.data.records import OccBatch
from occ_mfd.engine import distributed as du
from occ_mfd.engine.ema import EMA
from occ_mfd.engine.optim import build_optimizers, clip_grads
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.eval.metrics import OccMetrics
from occ_mfd.eval.speed import measure, pipeline_stages, speedups
from occ_mfd.grid import FREE_ID, OCC3D_GRID
from occ_mfd.models import sparse as S
from occ_mfd.models.snapshot import InferenceParts, save_snapshot, snapshot_from_parts

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30
CARD_GB = 24            # the card the default batch sizes are meant for
CARD_RESERVE_GB = 1.5   # CUDA context, cuDNN/cuBLAS workspaces and fragmentation beyond max_memory_reserved
CUDA_ITEMS = ("pytest_gpu", "bf16_teacher_step", "bf16_mfd_steps", "spconv_cuda_vs_dense", "nccl_all_reduce",
              "compile_forecaster", "bench_teacher10_vs_student1", "peak_memory_vae_step",
              "peak_memory_teacher_step")
CPU_ITEMS = ("spconv_status", "cpu_bf16_autocast", "cpu_sparse_vs_dense")


class CheckFailed(AssertionError):
    """A check of an item did not hold (the item fails; the figures so far are kept)."""


class SkipItem(Exception):
    """The item cannot run here (the message says why)."""


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


@dataclass
class Result:
    status: str
    seconds: float
    figures: dict = field(default_factory=dict)
    message: str = ""


class Checker:
    """Runs items in order within a time budget; an item that raises fails (or skips), the others still run."""

    def __init__(self, budget_s: float, only: set[str] | None = None, skip: set[str] | None = None,
                 echo=print):
        self.t0, self.budget_s = time.monotonic(), budget_s
        self.only, self.skip, self.echo = only, skip or set(), echo
        self.results: dict[str, Result] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def run(self, name: str, fn, *args) -> Result:
        figures: dict = {}
        t0 = time.monotonic()
        if (self.only and name not in self.only) or name in self.skip:
            res = Result("skip", 0.0, {}, "not selected (--only / --skip)")
        elif self.left() <= 0:
            res = Result("skip", 0.0, {}, f"the time budget of {self.budget_s:.0f} s is used up")
        else:
            self.echo(f"[gpu_check] {name} …", flush=True)
            try:
                message = fn(figures, *args) or ""
                res = Result("pass", 0.0, figures, message)
            except SkipItem as e:
                res = Result("skip", 0.0, figures, str(e))
            except Exception as e:  # any failure is this item's result, not the end of the check
                where = traceback.extract_tb(e.__traceback__)[-1]
                res = Result("fail", 0.0, figures, f"{type(e).__name__}: {e} ({Path(where.filename).name}:"
                                                   f"{where.lineno})")
            finally:
                _free_cuda()
        res.seconds = round(time.monotonic() - t0, 2)
        self.results[name] = res
        return res


def _free_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------ random-weight stages

def _randomise_zero_params(module: torch.nn.Module, std: float = 0.02) -> None:
    """adaLN-Zero gates and output layers start at exactly 0 (the net would output 0): give them small values so
    outputs, gradients and comparisons mean something."""
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and p.abs().max() == 0:
                p.normal_(0.0, std)


#: configs/tiny shrunk further for the CPU-side checks and the rehearsal: 50×50×4 grid, 4 × 25 × 25 latents, a
#: 16-channel forecaster, MFD sub-steps of 0.25 (a few teacher calls per student step).
MINI = {"pool": 4, "vae": {"grid_z": 4, "channels": (16, 16), "downsample": 2, "latent_channels": 4},
        "net": {"base_channels": 16}, "mfd": {"max_substep": 0.25}}


class World:
    """The VAE → teacher → MFD stages of one config folder with random weights, written as snapshots to a
    temporary folder and loaded back through the project's own code (what training and eval do)."""

    def __init__(self, cfg_dir: Path, tmp: Path, device: torch.device, overrides: dict | None = None):
        """``overrides``: {"pool": int, "vae": {...}, "net": {...}, "mfd": {...}} merged into the configs (MINI)."""
        self.cfg_dir, self.tmp, self.device = Path(cfg_dir), Path(tmp), device
        over = dict(overrides or {})
        self.vae_cfg = Config.fromfile(str(self.cfg_dir / "vae.py"))
        self.teacher_cfg = Config.fromfile(str(self.cfg_dir / "occfm.py"))
        self.mfd_cfg = Config.fromfile(str(self.cfg_dir / "mfd.py"))
        if over.get("vae"):
            self.vae_cfg.merge_from_dict({f"objective.vae.{k}": v for k, v in over["vae"].items()})
        if over.get("net"):
            self.teacher_cfg.merge_from_dict({f"objective.net.{k}": v for k, v in over["net"].items()})
        self.mfd_overrides = dict(over.get("mfd", {}))
        data = self.teacher_cfg.data
        self.past, self.future = int(data.past), int(data.future)
        self.pool = int(over.get("pool", data.get("pool", 1)))
        self.grid = OCC3D_GRID.pooled(self.pool) if self.pool > 1 else OCC3D_GRID
        self.meta = dict(grid=self.grid.to_dict(), data={"pool": self.pool, "past": self.past, "future": self.future},
                         git_rev="gpu_check")
        self._paths: dict[str, Path] = {}

    # objectives (fresh each call, on the device)
    def vae_objective(self):
        torch.manual_seed(0)
        return build(to_plain(self.vae_cfg.objective)).to(self.device)

    def teacher_objective(self):
        torch.manual_seed(1)
        obj = build({**to_plain(self.teacher_cfg.objective), "vae_snapshot": str(self.vae_snapshot())})
        _randomise_zero_params(obj.net)
        return obj.to(self.device)

    def mfd_objective(self):
        torch.manual_seed(2)
        cfg = {**to_plain(self.mfd_cfg.objective), "teacher_snapshot": str(self.teacher_snapshot()),
               **self.mfd_overrides}
        return build(cfg).to(self.device)

    # snapshots (written once)
    def vae_snapshot(self) -> Path:
        if "vae" not in self._paths:
            torch.manual_seed(0)
            vae = build(to_plain(self.vae_cfg.objective.vae))
            self._paths["vae"] = save_snapshot(snapshot_from_parts(InferenceParts("vae", {"vae": vae}), **self.meta),
                                               self.tmp / "vae" / "snapshot.pt")
        return self._paths["vae"]

    def teacher_snapshot(self) -> Path:
        if "teacher" not in self._paths:
            obj = self.teacher_objective()
            self._paths["teacher"] = save_snapshot(snapshot_from_parts(obj.inference_parts(), **self.meta),
                                                   self.tmp / "teacher" / "snapshot.pt")
        return self._paths["teacher"]

    def student_snapshot(self) -> Path:
        if "student" not in self._paths:
            obj = self.mfd_objective()
            with torch.no_grad():   # the student starts as a copy of the teacher: make it a different network
                for p in obj.student.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            self._paths["student"] = save_snapshot(snapshot_from_parts(obj.inference_parts(), **self.meta),
                                                   self.tmp / "student" / "snapshot.pt")
        return self._paths["student"]

    def batch(self, batch_size: int, seed: int = 0) -> OccBatch:
        """Synthetic sequences on the grid: ground plane, random boxes moving along x, the ego driving at 4 m/s."""
        X, Y, Z = self.grid.shape
        T = self.past + self.future
        g = torch.Generator().manual_seed(seed)
        occ = torch.full((batch_size, T, X, Y, Z), FREE_ID, dtype=torch.long)
        occ[..., 0] = 11                                                    # driveable surface
        for b in range(batch_size):
            for _ in range(max(4, X * Y // 400)):
                x, y = (int(torch.randint(0, n - 8, (1,), generator=g)) for n in (X, Y))
                cls = int(torch.randint(0, 17, (1,), generator=g))
                for t in range(T):
                    occ[b, t, x + t % 4:x + t % 4 + 4, y:y + 4, 1:max(2, Z // 3)] = cls
        ego = torch.eye(4).repeat(batch_size, T, 1, 1)
        ego[:, :, 0, 3] = 2.0 * (torch.arange(T) - (self.past - 1))
        return OccBatch(past=occ[:, :self.past], future=occ[:, self.past:], ego=ego, grid=self.grid).to(self.device)


# ----------------------------------------------------------------------------------------- items

def item_spconv_status(figs: dict) -> str:
    st = S.spconv_status()
    figs.update(dists=list(st.dists), version=st.version, build_cuda=st.cuda, cpu_only=st.cpu_only,
                usable=st.usable, torch=torch.__version__, torch_cuda=torch.version.cuda)
    if not st.installed:
        raise SkipItem(st.problem)
    expect(st.usable, st.problem or "spconv is not usable")
    if torch.cuda.is_available():
        problem = S._device_problem(torch.device("cuda"))
        expect(problem is None, problem or "")
    return f"{', '.join(st.dists)} {st.version} fits torch {torch.__version__}"


def _record_dtypes(objective) -> tuple[dict, list]:
    seen: dict[str, set] = {}
    hooks = []
    for name, mod in objective.named_children():
        if name in ("net", "teacher", "student", "aux"):
            def hook(_m, _inp, out, name=name):
                if isinstance(out, torch.Tensor):
                    seen.setdefault(name, set()).add(str(out.dtype).replace("torch.", ""))
            hooks.append(mod.register_forward_hook(hook))
    return seen, hooks


def bf16_step(objective, batch, phase: str, device: torch.device, runs: int = 1) -> dict:
    """One optimiser step of ``phase`` under bf16 autocast, as the training loop takes it (autocast around the
    forward only; fp32 parameters, gradients and AdamW state). Checks: every network that ran returned bf16, the
    loss is an fp32 finite scalar, every gradient is fp32 and finite and some are non-zero."""
    seen, hooks = _record_dtypes(objective)
    params = objective.param_groups()[phase]
    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    try:
        for _ in range(runs):
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = objective(batch, phase)
            out.loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(1e3 * (time.perf_counter() - t0))
    finally:
        for h in hooks:
            h.remove()
    grads = [p.grad for p in params if p.grad is not None]
    figs = {"ms_median": round(float(np.median(times)), 1), "loss": float(out.loss.detach()),
            "loss_dtype": str(out.loss.dtype).replace("torch.", ""),
            "network_output_dtypes": {k: sorted(v) for k, v in seen.items()},
            "grad_dtypes": sorted({str(g.dtype).replace("torch.", "") for g in grads}),
            "params_with_grad": len(grads), "params": len(params)}
    expect(seen and all(v == {"bfloat16"} for v in seen.values()),
           f"{phase}: networks under bf16 autocast returned {figs['network_output_dtypes']} (expected bfloat16)")
    expect(out.loss.dtype == torch.float32 and out.loss.dim() == 0 and math.isfinite(figs["loss"]),
           f"{phase}: loss {figs['loss']} of dtype {figs['loss_dtype']} (expected a finite float32 scalar)")
    expect(grads and figs["grad_dtypes"] == ["float32"], f"{phase}: gradient dtypes {figs['grad_dtypes']}")
    expect(all(bool(torch.isfinite(g).all()) for g in grads), f"{phase}: non-finite gradients")
    expect(any(bool(g.abs().sum() > 0) for g in grads), f"{phase}: every gradient is zero")
    return figs


def item_bf16_teacher_step(figs: dict, world: World, batch_size: int) -> str:
    obj = world.teacher_objective()
    figs["batch_size"] = batch_size
    figs.update(bf16_step(obj, world.batch(batch_size), obj.phase(0), world.device, runs=3))
    return f"{figs['ms_median']} ms/step, networks {figs['network_output_dtypes']}, loss {figs['loss_dtype']}"


def item_bf16_mfd_steps(figs: dict, world: World, batch_size: int) -> str:
    obj = world.mfd_objective()
    batch = world.batch(batch_size)
    # The solver state stays fp32 under autocast (objectives/mfd.py): the generated x1 must be float32.
    generated = []
    generate = obj.generate
    obj.generate = lambda *a, **k: generated.append(generate(*a, **k)) or generated[-1]
    figs["batch_size"] = batch_size
    for phase in ("aux", "student"):
        figs[phase] = bf16_step(obj, batch, phase, world.device)
    figs["generated_dtypes"] = sorted({str(x.dtype).replace("torch.", "") for x in generated})
    expect(figs["generated_dtypes"] == ["float32"], f"MFD generate() returned {figs['generated_dtypes']} under "
                                                    f"autocast (the solver state must stay float32)")
    return f"aux {figs['aux']['ms_median']} ms, student {figs['student']['ms_median']} ms"


def item_cpu_bf16_autocast(figs: dict, world: World) -> str:
    expect(world.device.type == "cpu", "runs on the CPU")
    figs["teacher"] = {}
    item_bf16_teacher_step(figs["teacher"], world, 1)
    figs["mfd"] = {}
    item_bf16_mfd_steps(figs["mfd"], world, 1)
    return "teacher and MFD steps (configs/tiny, shrunk) under CPU bf16 autocast: bf16 networks, fp32 loss/grads"


def _occupancy(shape, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < density


def stem_vs_dense(figs: dict, device: torch.device, shape, density: float, in_ch: int, out_ch: int,
                  runs: int = 3) -> None:
    """spconv stem vs dense twin with the same parameters: forward, input and parameter gradients."""
    status = S.spconv_status()
    if not status.usable:
        raise SkipItem(f"spconv not usable: {status.problem}")
    problem = S._device_problem(device)
    if problem is not None:
        raise SkipItem(problem)
    torch.manual_seed(0)
    a = S.OccupiedStem3d(in_ch, out_ch, 2, sparse=True).to(device)
    with torch.no_grad():
        a.bias1.normal_()
        a.bias2.normal_()
    b = S.OccupiedStem3d(in_ch, out_ch, 2, sparse=False).to(device)
    b.load_state_dict(a.state_dict())
    occ = _occupancy(shape, density).to(device)
    feats = torch.randn(*shape, in_ch, generator=torch.Generator().manual_seed(1)).to(device)
    times = {"spconv": [], "dense": []}
    for _ in range(runs):
        outs = {}
        for name, m in (("spconv", a), ("dense", b)):
            m.zero_grad(set_to_none=True)
            x = feats.clone().requires_grad_(True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            y = m(x, occ)
            (y * torch.cos(y.detach())).sum().backward()   # a fixed, non-uniform upstream gradient
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(1e3 * (time.perf_counter() - t0))
            outs[name] = (y.detach(), x.grad, [p.grad for p in m.parameters()])
    (ya, gxa, gpa), (yb, gxb, gpb) = outs["spconv"], outs["dense"]
    rel = lambda u, v: float((u - v).abs().max() / v.abs().max().clamp_min(1e-12))
    figs.update(shape=list(shape), occupied_fraction=round(float(occ.float().mean()), 4), channels=[in_ch, out_ch],
                forward_rel_err=rel(ya, yb), input_grad_rel_err=rel(gxa, gxb),
                param_grad_rel_err=max(rel(u, v) for u, v in zip(gpa, gpb)),
                spconv_ms=round(float(np.median(times["spconv"])), 2),
                dense_ms=round(float(np.median(times["dense"])), 2))
    # fp32 on both sides; on CUDA cuDNN (and spconv's GEMMs) may use TF32 (10-bit mantissa): 5e-3 of the max.
    tol = 5e-3 if device.type == "cuda" else 1e-4
    for k in ("forward_rel_err", "input_grad_rel_err", "param_grad_rel_err"):
        expect(figs[k] < tol, f"{k} = {figs[k]:.2e} ≥ {tol:g}")
    expect(bool((ya != 0).any()), "the stem's output is all zero")


def item_cpu_sparse_vs_dense(figs: dict, small: bool) -> str:
    shape = (2, 24, 24, 8) if small else (2, 100, 100, 8)
    stem_vs_dense(figs, torch.device("cpu"), shape, 0.14, 12, 8)
    return f"max rel. errors {figs['forward_rel_err']:.1e} / {figs['param_grad_rel_err']:.1e}"


def item_spconv_cuda_vs_dense(figs: dict, device: torch.device, world: World) -> str:
    """The VAE's stem at the config's size: voxel features (class + height embedding) → stem3d_channels over
    the frames of one VAE step, at Occ3D's occupancy (6 %) and at a dense 50 %."""
    vae = to_plain(world.vae_cfg.objective.vae)
    c_in, c_out = int(vae.get("class_dim", 8)) + int(vae.get("height_dim", 4)), int(vae.get("stem3d_channels") or 16)
    X, Y, Z = world.grid.shape
    frames = 4 if device.type == "cuda" else 1
    for name, density in (("occ3d_like", 0.06), ("dense", 0.5)):
        figs[name] = {}
        stem_vs_dense(figs[name], device, (frames, X, Y, Z), density, c_in, c_out)
    return (f"spconv {figs['occ3d_like']['spconv_ms']} ms vs dense {figs['occ3d_like']['dense_ms']} ms "
            f"(fwd+bwd, {frames} frames, 6 % occupied)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def item_nccl_all_reduce(figs: dict, device: torch.device) -> str:
    """A 1-process group set up in the order torch documents (set_device, then init_process_group with
    device_id), then the project's collectives on it. gloo on the CPU (rehearsal)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if du.is_active():
        raise SkipItem("a process group already exists in this process")
    if backend == "nccl" and not dist.is_nccl_available():
        raise CheckFailed("this torch build has no NCCL")
    kw = {}
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        kw["device_id"] = device
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1, **kw)
    try:
        figs["backend"] = dist.get_backend()
        t = torch.arange(6, dtype=torch.float32, device=device)
        dist.all_reduce(t)
        expect(torch.equal(t.cpu(), torch.arange(6, dtype=torch.float32)), f"all_reduce gave {t.tolist()}")
        x = torch.tensor([1.5, -2.0])                              # a CPU tensor: moved to the GPU and back
        du.all_reduce_sum_(x)
        expect(x.tolist() == [1.5, -2.0] and x.device.type == "cpu", f"all_reduce_sum_ gave {x}")
        expect(du.all_reduce_max([3.0, 1.0]) == [3.0, 1.0], "all_reduce_max")
        expect(du.all_gather_object({"rank": 0}) == [{"rank": 0}], "all_gather_object")
        du.barrier()
        m = OccMetrics(num_classes=3, free_id=2, horizons=1)
        m.update(torch.tensor([[[[[0, 1, 2]]]]]), torch.tensor([[[[[0, 2, 2]]]]]))
        before = m.confusion.clone()
        m.all_reduce()
        expect(torch.equal(m.confusion.cpu(), before.cpu()), "OccMetrics.all_reduce changed the counts")
        figs["checks"] = ["all_reduce", "all_reduce_sum_", "all_reduce_max", "all_gather_object", "barrier",
                          "OccMetrics.all_reduce"]
    finally:
        dist.destroy_process_group()
    return f"{figs['backend']}: {len(figs['checks'])} collectives"


def item_compile_forecaster(figs: dict, world: World) -> str:
    """torch.compile of the teacher's forecaster (what bench --compile times): same latents as eager."""
    pipe, _ = load_forecaster(world.teacher_snapshot(), device=world.device)
    batch = world.batch(1)

    def run(p):
        x = batch
        with torch.inference_mode():
            for name, fn in pipeline_stages(p, 2, seed=3):
                x = fn(x)
                if name == "sample":
                    latents = x
        return latents, x

    ref_lat, ref_cls = run(pipe)
    comp = copy.deepcopy(pipe)
    comp.net = torch.compile(comp.net)
    t0 = time.perf_counter()
    lat, cls = run(comp)
    figs["first_call_s"] = round(time.perf_counter() - t0, 1)
    sync = (lambda: torch.cuda.synchronize(world.device)) if world.device.type == "cuda" else (lambda: None)
    for name, p in (("eager", pipe), ("compiled", comp)):
        ts = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            run(p)
            sync()
            ts.append(1e3 * (time.perf_counter() - t0))
        figs[f"{name}_ms_2_steps"] = round(float(np.median(ts)), 2)
    figs["latent_rel_err"] = float((lat - ref_lat).norm() / ref_lat.norm())
    figs["class_agreement"] = float((cls == ref_cls).float().mean())
    expect(figs["latent_rel_err"] < 1e-3, f"compiled latents differ from eager by {figs['latent_rel_err']:.1e}")
    return f"compile {figs['first_call_s']} s; {figs['eager_ms_2_steps']} → {figs['compiled_ms_2_steps']} ms"


def item_bench(figs: dict, world: World, runs: int, warmup: int) -> str:
    """teacher@10 vs student@1 end to end (encode + sample + decode + argmax), batch 1, fp32 and bf16 autocast."""
    teacher, _ = load_forecaster(world.teacher_snapshot(), device=world.device)
    student, _ = load_forecaster(world.student_snapshot(), device=world.device)
    batch = world.batch(1)
    kw = dict(runs=runs, warmup=warmup, device=world.device, progress=False)
    rows = [measure("teacher@10", 10, 10, pipeline_stages(teacher, 10), batch, **kw),
            measure("student@1", 1, 1, pipeline_stages(student, 1), batch, **kw),
            measure("teacher@10+bf16", 10, 10, pipeline_stages(teacher, 10, autocast=torch.bfloat16), batch,
                    options=["bf16-autocast"], dtype="bfloat16", **kw),
            measure("student@1+bf16", 1, 1, pipeline_stages(student, 1, autocast=torch.bfloat16), batch,
                    options=["bf16-autocast"], dtype="bfloat16", **kw)]
    ups = speedups(rows, "teacher@10")
    figs.update(runs=runs, warmup=warmup, teacher_cfg_scale=float(teacher.cfg_scale),
                rows={r.name: {"ms_median": round(r.latency_ms_median, 2), "ms_p90": round(r.latency_ms_p90, 2),
                               "fps": round(r.fps, 2), "dtype": r.dtype,
                               "stages_ms": {k: round(v, 2) for k, v in r.stages_ms.items()}} for r in rows},
                speedup_vs_teacher10={k: round(v, 2) for k, v in ups.items()})
    expect(ups["student@1"] > 1.0, f"student@1 is not faster than teacher@10 (×{ups['student@1']:.2f})")
    return (f"teacher@10 {figs['rows']['teacher@10']['ms_median']} ms, student@1 "
            f"{figs['rows']['student@1']['ms_median']} ms (×{ups['student@1']:.1f}; "
            f"bf16 ×{ups['student@1+bf16']:.1f})")


def train_steps(cfg: Config, objective, batch, device: torch.device, steps: int = 2) -> None:
    """The loop's step (engine/loop.py): zero_grad, forward under the config's autocast, backward, clipping,
    AdamW, EMA; ``steps`` ≥ 2 so that AdamW's state and the EMA shadows exist at the peak."""
    tc = to_plain(cfg.get("train", {}))
    optim_cfg = to_plain(cfg.optim)
    opts = build_optimizers(objective, optim_cfg)
    groups = objective.param_groups()
    ema_modules = objective.ema_modules()
    ema = EMA(ema_modules, float(tc.get("ema_decay", 0.999))) if ema_modules and tc.get("ema_decay") else None
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if tc.get("amp") == "bf16" and device.type == "cuda"
           else contextlib.nullcontext())
    for step in range(steps):
        phase = objective.phase(step)
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        with amp:
            out = objective(batch, phase)
        out.loss.backward()
        clip_grads(groups[phase], optim_cfg[phase].get("grad_clip"))
        opts[phase].step()
        if ema is not None:
            ema.update()


def item_peak_memory(figs: dict, world: World, stage: str) -> str:
    """Peak CUDA memory of training steps of ``stage`` (vae / teacher) at batch 1, 2 and the config's batch; the
    per-sample slope gives the largest batch that fits a 24 GB card (minus a reserve for context and workspace)."""
    device = world.device
    if device.type != "cuda":
        raise SkipItem("peak memory is measured on CUDA only")
    cfg = world.vae_cfg if stage == "vae" else world.teacher_cfg
    make = world.vae_objective if stage == "vae" else world.teacher_objective
    config_batch = int(cfg.train.batch_size)
    figs.update(config_batch_size=config_batch, amp=cfg.train.get("amp"), frames_per_sample=world.past + world.future)
    peaks = {}
    for b in sorted({1, 2, config_batch}):
        _free_cuda()
        objective = make()
        batch = world.batch(b)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        train_steps(cfg, objective, batch, device)
        torch.cuda.synchronize(device)
        peaks[b] = (torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB)
        figs[f"batch_{b}"] = {"peak_allocated_GiB": round(peaks[b][0], 2), "peak_reserved_GiB": round(peaks[b][1], 2),
                              "s_per_2_steps": round(time.perf_counter() - t0, 2)}
        del objective, batch
    figs.update(card_fit({b: r for b, (_, r) in peaks.items()}, config_batch))
    expect(figs["fits_24GB"], f"batch {config_batch} needs {figs['config_batch_needs_GiB']:.1f} GiB (incl. "
                              f"{CARD_RESERVE_GB} reserve) > {CARD_GB}; a 24 GB card takes batch ≤ "
                              f"{figs['max_batch_for_24GB']}")
    return (f"batch {config_batch}: {peaks[config_batch][1]:.1f} GiB reserved; {figs['per_sample_GiB']:.2f} GiB per "
            f"sample; 24 GB card: batch ≤ {figs['max_batch_for_24GB']}")


def card_fit(reserved_gib: dict[int, float], config_batch: int, card_gb: float = CARD_GB,
             reserve_gb: float = CARD_RESERVE_GB) -> dict:
    """Peak reserved GiB at batch 1 and 2 (and the config's) → memory per sample (the 1 → 2 slope), the largest
    batch whose extrapolated peak + ``reserve_gb`` fits ``card_gb``, and whether the config's batch fits."""
    slope = reserved_gib[2] - reserved_gib[1]
    fixed = reserved_gib[1] - slope
    need = reserved_gib[config_batch] + reserve_gb
    return {"per_sample_GiB": round(slope, 3),
            "max_batch_for_24GB": int((card_gb - reserve_gb - fixed) // slope) if slope > 0 else None,
            "config_batch_needs_GiB": round(need, 2), "fits_24GB": need <= card_gb}


def item_pytest_gpu(figs: dict, timeout_s: float) -> str:
    """The tests marked ``gpu`` in a subprocess (junit XML gives the counts)."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
               str(REPO / "tests")]
        try:
            r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(30.0, timeout_s))
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"pytest -m gpu did not finish within {timeout_s:.0f} s") from None
        if not xml.is_file():
            raise CheckFailed(f"pytest -m gpu wrote no report (exit {r.returncode}): "
                              f"{r.stdout[-500:]}{r.stderr[-500:]}")
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    figs.update(counts, failed=failed, exit_status=r.returncode)
    expect(counts["tests"] > 0, "no test marked gpu was collected")
    expect(not failed and r.returncode == 0, f"{len(failed)} gpu test(s) failed: {', '.join(failed)[:400]}")
    return f"{counts['tests'] - counts['skipped']} passed, {counts['skipped']} skipped"


# ------------------------------------------------------------------------------------------ main

def machine_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        info.update(gpu=p.name, gpu_memory_GiB=round(p.total_memory / GiB, 1),
                    compute_capability=f"{p.major}.{p.minor}",
                    gpu_count=torch.cuda.device_count(), bf16_supported=torch.cuda.is_bf16_supported(),
                    nccl=_nccl_version())
    st = S.spconv_status()
    info["spconv"] = {"dists": list(st.dists), "version": st.version, "usable": st.usable, "problem": st.problem}
    return info


def _nccl_version() -> str | None:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # no NCCL in this build
        return None
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def cuda_absent_reason() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="JSON with every figure (default: gpu_check.json)")
    p.add_argument("--device", help="cuda | cuda:N | cpu (default: cuda if torch sees a GPU, else cpu)")
    p.add_argument("--configs", default=str(REPO / "configs/nuscenes"),
                   help="config folder of the CUDA part (vae.py, occfm.py, mfd.py; default: the full-size ones)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the CUDA part on --device with configs/tiny (checks the code, not a GPU)")
    p.add_argument("--budget-s", type=float, default=540.0, help="time budget of all items (default 540 s)")
    p.add_argument("--bench-runs", type=int, default=20)
    p.add_argument("--bench-warmup", type=int, default=5)
    p.add_argument("--only", nargs="+", metavar="ITEM", help="run only these items")
    p.add_argument("--skip", nargs="+", default=[], metavar="ITEM", help="skip these items")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = du.check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except du.DeviceUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = sorted((set(args.only or []) | set(args.skip)) - set(CPU_ITEMS + CUDA_ITEMS))
    if unknown:
        print(f"error: unknown item(s) {unknown}; items: {', '.join(CPU_ITEMS + CUDA_ITEMS)}", file=sys.stderr)
        return 2
    chk = Checker(args.budget_s, set(args.only) if args.only else None, set(args.skip))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        cpu = torch.device("cpu")
        tiny = World(REPO / "configs/tiny", tmp / "tiny", cpu, MINI)
        chk.run("spconv_status", item_spconv_status)
        chk.run("cpu_bf16_autocast", item_cpu_bf16_autocast, tiny)
        chk.run("cpu_sparse_vs_dense", item_cpu_sparse_vs_dense, args.rehearse)

        absent = cuda_absent_reason()
        run_cuda = device.type == "cuda" or args.rehearse
        if not run_cuda:
            cuda_part = f"skipped: {absent or 'device ' + str(device)}"
            for name in CUDA_ITEMS:
                why = absent or f"asked for {device}"
                chk.results[name] = Result("skip", 0.0, {}, f"CUDA part skipped: {why}")
        else:
            cuda_part = "ran" if not args.rehearse else f"rehearsed on {device} with configs/tiny shrunk (no GPU check)"
            cfg_dir = Path(REPO / "configs/tiny") if args.rehearse else Path(args.configs)
            world = World(cfg_dir, tmp / "world", device, MINI if args.rehearse else None)
            step_batch = 1 if args.rehearse else int(world.teacher_cfg.train.batch_size)
            if device.type == "cuda":
                chk.run("pytest_gpu", item_pytest_gpu, min(240.0, max(30.0, chk.left() - 300)))
            else:
                chk.results["pytest_gpu"] = Result("skip", 0.0, {}, "rehearsal: the gpu tests need CUDA")
            chk.run("bf16_teacher_step", item_bf16_teacher_step, world, step_batch)
            chk.run("bf16_mfd_steps", item_bf16_mfd_steps, world, int(world.mfd_cfg.train.batch_size)
                    if not args.rehearse else 1)
            chk.run("spconv_cuda_vs_dense", item_spconv_cuda_vs_dense, device, world)
            chk.run("nccl_all_reduce", item_nccl_all_reduce, device)
            chk.run("compile_forecaster", item_compile_forecaster, world)
            chk.run("bench_teacher10_vs_student1", item_bench, world, args.bench_runs, args.bench_warmup)
            chk.run("peak_memory_vae_step", item_peak_memory, world, "vae")
            chk.run("peak_memory_teacher_step", item_peak_memory, world, "teacher")

    failed = [n for n, r in chk.results.items() if r.status == "fail"]
    report = {"machine": machine_info(device), "cuda_part": cuda_part,
              "configs": str(args.configs) if run_cuda and not args.rehearse else None,
              "budget_s": args.budget_s, "seconds": round(time.monotonic() - chk.t0, 1),
              "items": {n: asdict(r) for n, r in chk.results.items()}, "passed": not failed}
    text = json.dumps(report, indent=2, default=str)
    out = atomic_write(Path(args.out), lambda f: f.write(text), binary=False)
    print_summary(report, out)
    return 1 if failed else 0


def print_summary(report: dict, out: Path) -> None:
    m = report["machine"]
    print(f"\n== gpu_check: torch {m['torch']} (CUDA {m['torch_cuda']}), {m.get('gpu', 'no GPU')}, "
          f"spconv {m['spconv']['dists'] or 'none'} {m['spconv']['version'] or ''} ==")
    for name, r in report["items"].items():
        print(f"{r['status'].upper():<5} {name:<28} {r['seconds']:>7.1f} s  {r['message']}")
    part = report["cuda_part"]
    if part.startswith("rehearsed"):
        print(f"CUDA part {part}")
    elif part != "ran":
        print(f"The CUDA part was SKIPPED ({part[len('skipped: '):]}): only the CPU-side checks ran.")
    n_fail = sum(r["status"] == "fail" for r in report["items"].values())
    print(f"{'all checks passed' if not n_fail else f'{n_fail} item(s) FAILED'}; every figure in {out}")


if __name__ == "__main__":
    sys.exit(main())
