"""The whole pipeline on the built-in synthetic world, small enough for a laptop CPU.

    python tools/demo.py [--work-dir work_dirs/demo] [--size demo|smoke]

Stages (each a separate tool, run as a subprocess so this file stays a thin list of commands):
world → prepare → VAE → teacher → MFD student → eval → bench → GIF. A stage whose output already exists is
skipped and says so, so running the demo again is cheap; the training stages resume by themselves, from
their last checkpoint (written every minute of training with the tiny configs, and on Ctrl-C / SIGTERM).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from occ_mfd.engine.preempt import EXIT_PREEMPTED   # stdlib only: the demo stays light

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

# World and training sizes. "smoke" is the end-to-end test's size: it checks the plumbing, not the quality.
SIZES = {
    "demo": dict(scenes=8, keyframes=40, sweeps=2, vae_steps=600, teacher_steps=400, mfd_steps=160,
                 bench_runs=50, bench_warmup=10, bench_train_runs=10, bench_train_warmup=2, max_eval=40),
    "smoke": dict(scenes=2, keyframes=12, sweeps=1, vae_steps=10, teacher_steps=10, mfd_steps=10,
                  bench_runs=3, bench_warmup=1, bench_train_runs=2, bench_train_warmup=0, max_eval=2),
}


def run(stage: str, cmd: list[str], done: Path | None, timings: dict) -> None:
    """Run one stage unless ``done`` exists; record its wall time."""
    if done is not None and done.exists():
        print(f"[demo] {stage}: reusing {done.relative_to(REPO) if done.is_relative_to(REPO) else done}")
        timings[stage] = 0.0
        return
    print(f"[demo] {stage}: {' '.join(str(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    returncode, interrupted = _run_forwarding_signals([str(c) for c in cmd])
    timings[stage] = time.perf_counter() - t0
    if interrupted or returncode == EXIT_PREEMPTED:
        print(f"[demo] stopped during stage '{stage}' (exit {returncode}); run the same command again to "
              f"continue: finished stages are reused and a training stage resumes from its last checkpoint.")
        sys.exit(EXIT_PREEMPTED)
    if returncode != 0:
        sys.exit(f"[demo] stage '{stage}' failed (exit {returncode}); fix the error above and run the "
                 f"same command again: finished stages are reused.")


def _run_forwarding_signals(cmd: list[str]) -> tuple[int, bool]:
    """Run a stage in its own session and pass each Ctrl-C / SIGTERM / SIGHUP on to it exactly once.

    In the terminal's process group a stage would get Ctrl-C directly, and ``subprocess.run`` would then
    SIGKILL it 0.25 s later: a training stage had no time to write its checkpoint. Forwarding one signal per
    signal keeps tools/train.py's rule (first: finish the step and checkpoint, second: exit at once).
    Returns (exit status, whether a signal was forwarded)."""
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
    got = []

    def forward(signum, frame):
        got.append(signum)
        proc.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait(), bool(got)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _pair(iou, miou) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    return f"{fmt(iou)} / {fmt(miou)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="work_dirs/demo", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    size = SIZES[args.size]
    w = (args.work_dir if args.work_dir.is_absolute() else REPO / args.work_dir).resolve()
    w.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    t_all = time.perf_counter()
    timings: dict[str, float] = {}

    world, occ = w / "world", w / "occ"
    run("world", [PY, "tools/make_synthetic.py", "--out", world, "--version", "v1.0-synth",
                  "--scenes", size["scenes"], "--keyframes", size["keyframes"],
                  "--sweeps-per-keyframe", size["sweeps"], "--seed", args.seed, "--workers", 2],
        world / "v1.0-synth" / "scene.json", timings)
    run("prepare", [PY, "tools/prepare_data.py", "--dataroot", world, "--version", "v1.0-synth",
                    "--out", occ, "--workers", 2], occ / "index.json", timings)

    snap = {name: w / name / "snapshot.pt" for name in ("vae", "teacher", "mfd")}
    common = [f"data.root={occ}"]
    run("vae", [PY, "tools/train.py", "configs/tiny/vae_fine.py", "--work-dir", w / "vae",
                "--max-steps", size["vae_steps"], "--cfg-options", *common], None, timings)
    run("teacher", [PY, "tools/train.py", "configs/tiny/occfm_ego.py", "--work-dir", w / "teacher",
                    "--max-steps", size["teacher_steps"], "--cfg-options", *common,
                    f"objective.vae_snapshot={snap['vae']}"], None, timings)
    run("mfd", [PY, "tools/train.py", "configs/tiny/mfd.py", "--work-dir", w / "mfd",
                "--max-steps", size["mfd_steps"], "--cfg-options", *common,
                f"objective.teacher_snapshot={snap['teacher']}"], None, timings)

    results, bench, gif = w / "results.json", w / "bench.json", w / "forecast.gif"
    eval_cmd = [PY, "tools/eval.py", "--data", occ, "--split", "val",
                "--model", f"teacher={snap['teacher']}:steps=10", "--model", f"teacher={snap['teacher']}:steps=1",
                "--model", f"student={snap['mfd']}:steps=1", "--recon",
                "--baseline", "copy-last", "--baseline", "cv-warp", "--baseline", "warp-last",
                "--out", results, "--csv", w / "results.csv", "--dump-forecasts", w / "forecasts", "--dump-count", 2,
                "--plot", w / "horizons.png"]
    if size["max_eval"]:
        eval_cmd += ["--max-sequences", size["max_eval"]]
    run("eval", eval_cmd, results, timings)
    run("bench", [PY, "tools/bench.py", "--teacher", snap["teacher"], "--student", snap["mfd"],
                  "--data", occ, "--split", "val", "--steps", 1, 10, "--runs", size["bench_runs"], "--warmup", size["bench_warmup"],
                  "--train-runs", size["bench_train_runs"], "--train-warmup", size["bench_train_warmup"],
                  "--out", bench],
        bench, timings)
    dumps = sorted((w / "forecasts" / "student@1").glob("*.npz"))
    if dumps:
        run("render", [PY, "visualize/view.py", "--forecast", dumps[0], "--render", gif], gif, timings)

    total = time.perf_counter() - t_all
    (w / "demo_timings.json").write_text(json.dumps({**timings, "total": total}, indent=2))
    print("\n[demo] stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {total:.0f}")
    if results.exists():
        print(f"\n[demo] results ({results}): IoU / mIoU in %, val split")
        print(f"{'row':<12}{'steps':>6}  {'mean 1/2/3 s (OccWorld/DOME)':>30}  {'mean all (OccFM)':>18}")
        for r in json.loads(results.read_text())["rows"]:
            print(f"{r['name']:<12}{r['steps']:>6}  {_pair(r['iou_mean_123'], r['miou_mean_123']):>30}  "
                  f"{_pair(r['iou_mean_all'], r['miou_mean_all']):>18}")
    print(f"[demo] outputs in {w}: occ/ (prepared data), vae/ teacher/ mfd/ (checkpoints, snapshots, TensorBoard), "
          f"results.json, bench.json, forecast.gif")


if __name__ == "__main__":
    main()
