"""The speed protocol (docs/design.md): batch 1, warm-up, ≥ 50 timed runs, device synchronisation, median and
p90, end to end and per stage.

A forecast is timed as a chain of named *stages* (``encode → sample → decode → argmax``), each a callable on the
previous stage's output: the stage methods of :class:`~occ_mfd.models.pipeline.OccForecastPipeline`, i.e. exactly
what ``forecast()`` runs in evaluation, with the same noise source (a CPU generator, re-seeded every run). Every
run synchronises the device before and after each stage (:func:`synchronize`; a no-op on CPU), so a stage's
time is its own work, and the end-to-end time is the whole chain. Medians are reported because machines are
noisy; p90 shows the tail.
"""
from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from occ_mfd.models.pipeline import OccForecastPipeline

Stage = tuple[str, Callable[[Any], Any]]
Clock = Callable[[], float]
#: The option of rows timed on consecutive windows of a drive with the history latents kept between runs.
STREAMING = "streaming"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); a no-op on CPU. The one place the
    speed protocol synchronises."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class SpeedRow:
    """One timed configuration. Times in ms; ``stages_ms`` holds each stage's median; fps = 1000 / median.
    ``dtype``: the compute dtype of the row ("float32", or "bfloat16" for rows timed under bf16 autocast)."""

    name: str
    steps: int
    nfe: int
    latency_ms_median: float
    latency_ms_p90: float
    fps: float
    stages_ms: dict[str, float]
    stages_ms_p90: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    warmup: int = 0
    options: list[str] = field(default_factory=list)
    dtype: str = "float32"

    def to_dict(self) -> dict:
        d = asdict(self)
        if STREAMING in self.options:   # a marker on streaming rows only: the other rows' fields stay as they were
            d["streaming"] = True
        return d


def time_stages(stages: list[Stage], inputs: Any, *, runs: int = 50, warmup: int = 10, device="cpu",
                desc: str | None = None, clock: Clock = time.perf_counter,
                sync: Callable[[Any], None] = synchronize,
                next_inputs: Callable[[int], Any] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the chain ``warmup`` times untimed, then ``runs`` times timed.

    Returns (end-to-end ms (runs,), stage name → ms (runs,)). ``clock`` (seconds) and ``sync`` are injectable
    so the bookkeeping is testable against a fake clock. ``next_inputs(i)`` (i = −warmup … runs − 1), when given,
    supplies run i's input instead of ``inputs``, outside the timed chain (streaming: each run forecasts the next
    window of a drive; :func:`consecutive_windows`).
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"time_stages: need runs ≥ 1 and warmup ≥ 0, got runs={runs}, warmup={warmup}")
    e2e = np.zeros(runs)
    per = {name: np.zeros(runs) for name, _ in stages}
    with torch.inference_mode():
        for i in tqdm(range(-warmup, runs), desc=desc, disable=desc is None, leave=False):
            x = inputs if next_inputs is None else next_inputs(i)
            sync(device)
            start = prev = clock()
            for name, fn in stages:
                x = fn(x)
                sync(device)
                now = clock()
                if i >= 0:
                    per[name][i] = 1e3 * (now - prev)
                prev = now
            if i >= 0:
                e2e[i] = 1e3 * (prev - start)
    return e2e, per


def measure(name: str, steps: int, nfe: int, stages: list[Stage], inputs: Any, *, runs: int = 50,
            warmup: int = 10, device="cpu", options: list[str] | None = None, progress: bool = True,
            clock: Clock = time.perf_counter, dtype: str = "float32",
            next_inputs: Callable[[int], Any] | None = None) -> SpeedRow:
    """Time a stage chain → :class:`SpeedRow` (median / p90 end to end and per stage); ``next_inputs``: see
    :func:`time_stages`."""
    e2e, per = time_stages(stages, inputs, runs=runs, warmup=warmup, device=device,
                           desc=f"bench {name}" if progress else None, clock=clock, next_inputs=next_inputs)
    med = float(np.median(e2e))
    return SpeedRow(name=name, steps=steps, nfe=nfe, latency_ms_median=med,
                    latency_ms_p90=float(np.percentile(e2e, 90)), fps=1e3 / med if med > 0 else float("inf"),
                    stages_ms={k: float(np.median(v)) for k, v in per.items()},
                    stages_ms_p90={k: float(np.percentile(v, 90)) for k, v in per.items()},
                    runs=runs, warmup=warmup, options=list(options or []), dtype=dtype)


def speedups(rows: list[SpeedRow], reference: str) -> dict[str, float]:
    """name → reference median latency / row median latency (> 1: faster than the reference)."""
    ref = next((r for r in rows if r.name == reference), None)
    if ref is None:
        raise ValueError(f"speedups: no row named {reference!r} among {[r.name for r in rows]}")
    return {r.name: ref.latency_ms_median / r.latency_ms_median for r in rows}


# ------------------------------------------------------------------------------------ forecast stages

def pipeline_stages(pipeline: OccForecastPipeline, steps: int, *, cfg_scale: float | None = None, seed: int = 0,
                    autocast: torch.dtype | None = None) -> list[Stage]:
    """``encode → sample → decode → argmax`` of ``pipeline`` on an ``OccBatch`` input: the stage methods that
    :meth:`OccForecastPipeline.forecast` chains, so ``argmax`` of the last stage equals ``forecast(batch,
    steps, generator=torch.Generator().manual_seed(seed)).classes`` (tested).

    The noise is drawn from a CPU generator re-seeded with ``seed`` every run (eval's noise source), so every run
    (and every pipeline timed with the same seed and shapes) integrates from the same x0. ``autocast``: e.g.
    torch.bfloat16 on CUDA, around every stage. Two-pass CFG: a pipeline with ``fused_cfg=False``.
    """
    def ctx(device):
        return _autocast(device, autocast)

    def encode(batch):
        with ctx(batch.past.device):
            return pipeline.encode(batch)                                         # ForecastCond

    def sample(cond):
        x0 = pipeline.noise(cond, torch.Generator().manual_seed(seed))            # (B, F, C, H, W)
        with ctx(x0.device):
            return pipeline.sample(cond, x0, steps, cfg_scale), cond              # (B, F, C, H, W), its condition

    def decode(state):
        x1, cond = state                # the condition rides along: a refining decoder reads its prior voxels
        with ctx(x1.device):
            return pipeline.decode_logits(x1, cond)                               # (B, F, K, X, Y, Z)

    return [("encode", encode), ("sample", sample), ("decode", decode), ("argmax", pipeline.to_classes)]


def floor_stages(pipeline, batch, *, seed: int = 0, autocast: torch.dtype | None = None) -> list[Stage]:
    """The floor of any forecaster: one (unguided) network evaluation + decode + argmax. The past latents are
    computed once here, outside the timed chain (a forecaster cannot do less than this)."""
    stages = pipeline_stages(pipeline, 1, cfg_scale=1.0, seed=seed, autocast=autocast)
    with torch.inference_mode():
        state = stages[0][1](batch)
    return [("prepared", lambda _: state)] + stages[1:]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def streaming_stages(streamer, steps: int, *, cfg_scale: float | None = None, seed: int = 0,
                     autocast: torch.dtype | None = None) -> list[Stage]:
    """The stages of a :class:`~occ_mfd.models.streaming.StreamingForecaster` on an ``OccBatch`` input:
    ``encode`` (the cached history latents + the new frame's, (1, P, C, H, W)) → ``prior`` (the net's ego-motion
    prior warped and encoded, (1, F, C, H, W), and the condition assembled; only for a net with a prior, else
    ``encode`` assembles it) → ``sample`` → ``decode`` → ``argmax`` of :func:`pipeline_stages` (same noise source).

    Fed with consecutive windows (:func:`consecutive_windows`), ``argmax`` equals ``streamer.forecast(batch, steps,
    generator=torch.Generator().manual_seed(seed)).classes`` and the pipeline's one-shot forecast up to float
    rounding (tested). The one-shot rows' ``encode`` is this row's ``encode`` + ``prior``.
    """
    has_prior = getattr(streamer.pipeline.net, "prior", None) is not None

    def encode(batch):
        with _autocast(batch.past.device, autocast):
            latents = streamer.past_latents(batch)                                # (1, P, C, H, W)
            return (batch, latents) if has_prior else streamer.condition(batch, latents)

    def prior(state):
        batch, latents = state
        with _autocast(batch.past.device, autocast):
            return streamer.condition(batch, latents)                             # ForecastCond

    tail = pipeline_stages(streamer.pipeline, steps, cfg_scale=cfg_scale, seed=seed, autocast=autocast)[1:]
    return [("encode", encode)] + ([("prior", prior)] if has_prior else []) + tail


def consecutive_windows(streamer, windows: list) -> Callable[[int], Any]:
    """``next_inputs`` for :func:`time_stages` on a streaming row: run after run, ``windows[1]``, ``windows[2]``, …
    of one drive (``windows``: batches of consecutive keyframes, each the previous shifted by one), so every run
    continues the previous one, the steady state of a drive. The history cache is primed with ``windows[0]``
    before the first run and again whenever the drive is exhausted and starts over at ``windows[1]``: those full
    encodes run outside the timed chain (a drive pays them once per scene, not per frame).
    """
    if len(windows) < 2:
        raise ValueError(f"consecutive_windows: a streaming row needs ≥ 2 consecutive windows of one drive, got "
                         f"{len(windows)}")
    position = len(windows)                      # past the end: prime before the first run

    def next_inputs(_run: int):
        nonlocal position
        if position >= len(windows):
            streamer.reset()
            streamer.past_latents(windows[0])    # the drive's first full encode, untimed
            position = 1
        position += 1
        return windows[position - 1]

    return next_inputs


def runtime_info(device: torch.device | str, dtype: str = "float32") -> dict:
    """Device name, dtype (the rows' default; each row also records its own), threads and versions, printed
    with every table."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "dtype": dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------ training steps

def time_training_step(objective, batch, phase: str, *, runs: int = 10, warmup: int = 2, device="cpu",
                       lr: float = 1e-6) -> dict:
    """Median / p90 ms of one optimiser step of ``objective`` in ``phase`` (forward incl. ``prepare``, backward,
    AdamW step) and the NFE the objective's logs report (the sum of its ``nfe_*`` scalars — teacher, aux, JVP —
    plus 1 student forward unless it logs ``nfe_student``). The objective's weights change: pass a copy."""
    params = objective.param_groups()[phase]
    opt = torch.optim.AdamW(params, lr=lr)
    objective.train()
    times, nfes = [], []
    for i in range(-warmup, runs):
        synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = objective(batch, phase)
        out.loss.backward()
        opt.step()
        synchronize(device)
        if i >= 0:
            times.append(1e3 * (time.perf_counter() - t0))
            logs = out.logs
            counts = {k: float(v) for k, v in logs.items() if k.startswith("nfe_")}
            if counts:   # a distiller's step: its teacher / aux / JVP evaluations, + 1 student forward unless logged
                nfes.append(sum(counts.values()) + (0.0 if "nfe_student" in counts else 1.0))
    res = {"ms_median": float(np.median(times)), "ms_p90": float(np.percentile(times, 90)), "runs": runs}
    if nfes:
        res["nfe_median"] = float(np.median(nfes))
    return res


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Convert 4-D weights to channels-last and 5-D ones to channels-last-3d, in place (``Module.to`` refuses
    mixed ranks). Activations follow the weights' layout inside cuDNN/oneDNN convolutions."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
            elif t.dim() == 5:
                t.data = t.data.contiguous(memory_format=torch.channels_last_3d)
    return module
