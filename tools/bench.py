#!/usr/bin/env python
"""Speed of the teacher at N steps and the one-step student, side by side in one process on the same inputs.

    python tools/bench.py --teacher runs/teacher/snapshot.pt --student runs/student/snapshot.pt \
        --steps 1 2 4 10 --runs 50 --warmup 10 --device cuda --bf16 --compile --cfg-two-pass --out bench.json

Protocol (docs/design.md): batch 1, warm-up ≥ 10, ≥ 50 timed runs, device synchronisation around every stage,
median and p90, end to end (encode + sample + decode + argmax) and per stage; the stages are the very methods
tools/eval.py's forecasts run. Speed-ups are ratios against teacher@10 (or the largest --steps). The floor is
one unguided network evaluation + decode + argmax.
Streaming row (``+streaming``, with --data; --no-streaming skips it): the student (the teacher without one) wrapped in
occ_mfd.models.streaming.StreamingForecaster, each run forecasting the next consecutive window of the first
sequence's scene, so the P − 1 history latents come from the previous run and one new frame is encoded (the
drive's first full encode is done before the timed runs).
Training steps (one AdamW update, prepare/encode included): teacher FM step, MFD aux step, MFD student step, on
objectives rebuilt from the configs stored in the snapshots (their weights do not change the time).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from mmengine.config import Config

from occ_mfd.atomic import atomic_write
from occ_mfd.builder import build
from occ_mfd.data.records import OccBatch, collate_sequences
from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.engine.distributed import DeviceUnavailable, check_device
from occ_mfd.eval.forecasters import load_forecaster
from occ_mfd.eval.speed import STREAMING, consecutive_windows, floor_stages, measure, pipeline_stages, runtime_info, \
    speedups, streaming_stages, time_training_step, to_channels_last
from occ_mfd.grid import FREE_ID
from occ_mfd.models.sparse import SparseUnavailable
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.models.streaming import StreamingForecaster


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher snapshot (or the teacher stage's work dir)")
    p.add_argument("--student", help="student (MFD) snapshot; without it only the teacher is timed")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10])
    p.add_argument("--student-steps", type=int, nargs="+", default=[1],
                   help="student rows student@K (a flow-map student, e.g. meanflow/smf/tvm/freeflow/ayf, samples K "
                        "flow-map jumps; a velocity student K Euler steps)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--data", help="prepared dataset: time on its first sequence (default: a synthetic scene)")
    p.add_argument("--split", default="val")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    p.add_argument("--bf16", action="store_true",
                   help="also time bf16 autocast (rows '+bf16', dtype bfloat16; meant for CUDA, runs on CPU too)")
    p.add_argument("--channels-last", action="store_true", help="also time channels-last networks")
    p.add_argument("--cfg-two-pass", action="store_true", help="also time CFG as two passes (vs the fused 2B batch)")
    p.add_argument("--no-streaming", action="store_true",
                   help="skip the streaming rows (history latents kept between consecutive windows; need --data)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step timings")
    p.add_argument("--train-runs", type=int, default=10)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--train-batch-size", type=int, default=1)
    p.add_argument("--out", help="bench JSON")
    return p.parse_args(argv)


def make_batch(args, info, device) -> OccBatch:
    """One sequence (batch 1): the first of --data, else a synthetic scene (ground plane + random boxes)."""
    if args.data:
        ds = OccSequenceDataset(args.data, args.split, past=info.past, future=info.future, pool=info.pool, mask=None)
        return collate_sequences([ds[0]]).to(device)
    if info.grid is None:
        raise ValueError(f"snapshot {info.path} stores no grid; pass --data")
    X, Y, Z = info.grid.shape
    T = info.past + info.future
    g = torch.Generator().manual_seed(0)
    occ = torch.full((1, T, X, Y, Z), FREE_ID, dtype=torch.long)
    occ[..., 0] = 11                                                      # driveable surface
    for _ in range(max(4, X * Y // 200)):                                 # static boxes of random classes
        x, y = int(torch.randint(0, X - 4, (1,), generator=g)), int(torch.randint(0, Y - 4, (1,), generator=g))
        occ[:, :, x:x + 4, y:y + 4, 1:max(2, Z // 3)] = int(torch.randint(0, 17, (1,), generator=g))
    ego = torch.eye(4).repeat(1, T, 1, 1)
    ego[0, :, 0, 3] = 2.0 * (torch.arange(T) - (info.past - 1))           # 4 m/s forward
    return OccBatch(past=occ[:, :info.past], future=occ[:, info.past:], ego=ego).to(device)


def drive_windows(args, info, device) -> list[OccBatch]:
    """The consecutive windows (batch 1 each, stride 1) of the scene of --data's first sequence, the inputs of the
    streaming rows; [] without --data (a synthetic window has no drive to continue)."""
    if not args.data:
        return []
    # cache_mb: consecutive windows share P + F − 1 frames; read each label file once
    ds = OccSequenceDataset(args.data, args.split, past=info.past, future=info.future, pool=info.pool, mask=None,
                            cache_mb=256)
    picked = [0]
    for j in range(1, min(len(ds), args.warmup + args.runs + 1)):
        (si, start), (prev_si, prev_start) = ds.windows[j], ds.windows[picked[-1]]
        if si != prev_si or start != prev_start + 1:     # another scene, or a gap (unlabelled frames): the drive ends
            break
        picked.append(j)
    return [collate_sequences([ds[j]]).to(device) for j in picked]


def streaming_rows(args, forecasters, info, device, rows: list, kw: dict) -> dict:
    """Append a ``NAME@N+streaming`` row per forecaster to ``rows``, each run the next consecutive window of a
    drive; → what the JSON's ``streaming`` entry says about them ({} when there is no drive to stream)."""
    windows = drive_windows(args, info, device)
    if len(windows) < 2:
        print(f"note: no streaming rows ({'no --data: ' if not args.data else ''}they need ≥ 2 consecutive "
              f"windows of one drive, got {len(windows)})", file=sys.stderr)
        return {}
    out = {"inputs": f"{len(windows)} consecutive windows of scene {windows[0].scenes[0]} (stride 1), each run "
                     f"the next; the drive's first full encode untimed", "rows": {}}
    for name, pipe, n in forecasters:
        streamer = StreamingForecaster(pipe)
        row = measure(f"{name}@{n}+{STREAMING}", n, n, streaming_stages(streamer, n), None, options=[STREAMING],
                      next_inputs=consecutive_windows(streamer, windows), **kw)
        rows.append(row)
        prior = getattr(pipe.net, "prior", None)
        # runs_continuing == runs: every warm-up and timed run encoded 1 history frame; the other calls were the
        # untimed primes of consecutive_windows
        out["rows"][row.name] = {"runs_continuing": streamer.hits, "runs": args.warmup + args.runs,
                                 "full_encodes_untimed": streamer.calls - streamer.hits,
                                 "history_frames_encoded_per_run": 1, "prior": prior,
                                 "prior_frames_encoded_per_run": 0 if prior is None else info.future}
    return out


def variant(pipeline, option: str, device):
    """A copy of the pipeline changed by ``option`` (compile / channels-last / cfg-two-pass)."""
    p = copy.deepcopy(pipeline)
    if option == "cfg-two-pass":
        p.fused_cfg = False
    elif option == "channels-last":
        to_channels_last(p.net)
        to_channels_last(p.codec)
    elif option == "compile":
        p.net = torch.compile(p.net)
    return p


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = check_device(args.device)
    except DeviceUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.bf16 and device.type != "cuda":
        print("warning: --bf16 on CPU: bf16 autocast runs, but CPU timings say little about a GPU's", file=sys.stderr)
    if min(args.steps + args.student_steps) < 1:
        print("error: --steps and --student-steps must be >= 1", file=sys.stderr)
        return 2
    short = args.runs < 50 or args.warmup < 10
    if short:
        print(f"warning: runs={args.runs}, warmup={args.warmup} is below the protocol (≥ 50 runs, ≥ 10 warm-up)",
              file=sys.stderr)
    try:
        teacher, t_info = load_forecaster(args.teacher, device=device)
        student, s_info = load_forecaster(args.student, device=device) if args.student else (None, None)
        batch = make_batch(args, t_info, device)
    except (FileNotFoundError, ValueError, RuntimeError, SparseUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = dict(runs=args.runs, warmup=args.warmup, device=device)
    cfg_nfe = lambda n: n * (2 if teacher.cfg_scale != 1.0 else 1)      # batch-B network evaluations
    rows = [measure(f"teacher@{n}", n, n, pipeline_stages(teacher, n), batch, **kw) for n in args.steps]
    ref_n = 10 if 10 in args.steps else max(args.steps)
    ref = f"teacher@{ref_n}"
    forecasters = [("teacher", teacher, ref_n)] + ([("student", student, 1)] if student is not None else [])
    if student is not None:
        rows += [measure(f"student@{k}", k, k, pipeline_stages(student, k), batch, **kw)
                 for k in dict.fromkeys(args.student_steps)]
    floor_net = student if student is not None else teacher
    rows.append(measure("floor", 1, 1, floor_stages(floor_net, batch), batch, **kw))
    # Streaming is about the one-step model (the teacher's 10 steps dwarf the encode it saves): only the student gets
    # a streaming row, or the teacher when no student is given.
    streaming = {} if args.no_streaming else streaming_rows(args, forecasters[-1:], t_info, device, rows, kw)
    if args.cfg_two_pass and teacher.cfg_scale != 1.0:
        rows.append(measure(f"{ref}+cfg-two-pass", ref_n, ref_n,
                            pipeline_stages(variant(teacher, "cfg-two-pass", device), ref_n), batch,
                            options=["cfg-two-pass"], **kw))
    for opt in [o for o, on in (("compile", args.compile), ("channels-last", args.channels_last)) if on]:
        for name, pipe, n in forecasters:
            rows.append(measure(f"{name}@{n}+{opt}", n, n, pipeline_stages(variant(pipe, opt, device), n), batch,
                                options=[opt], **kw))
    if args.bf16:
        for name, pipe, n in forecasters:
            rows.append(measure(f"{name}@{n}+bf16", n, n, pipeline_stages(pipe, n, autocast=torch.bfloat16),
                                batch, options=["bf16-autocast"], dtype="bfloat16", **kw))
    ups = speedups(rows, ref)
    floor = next(r for r in rows if r.name == "floor")
    dtype = "float32" + (" (rows +bf16: bfloat16 autocast)" if args.bf16 else "")
    result = {"device": runtime_info(device, dtype), "protocol": {
        "batch_size": 1, "runs": args.runs, "warmup": args.warmup, "meets_protocol": not short,
        "inputs": args.data or "synthetic scene", "teacher": args.teacher, "student": args.student,
        "teacher_cfg_scale": float(teacher.cfg_scale), "teacher_shift": float(teacher.shift),
        "teacher_net_evals_per_step": cfg_nfe(1), "fused_cfg": True,
        "floor": "one unguided network evaluation + decode + argmax (of the student if given)",
        "end_to_end": "encode + sample + decode + argmax"},
        "rows": [r.to_dict() for r in rows], "speedup_reference": ref, "speedups": ups}
    by_name = {r.name: r for r in rows}
    if student is not None and 1 in args.student_steps:
        result["student_over_floor"] = by_name["student@1"].latency_ms_median / floor.latency_ms_median
    if streaming:
        result["streaming"] = streaming
        if f"student@1+{STREAMING}" in by_name:
            s_ms = by_name[f"student@1+{STREAMING}"].latency_ms_median
            result["student_streaming_over_floor"] = s_ms / floor.latency_ms_median
            if "student@1" in by_name:
                result["student_streaming_over_student"] = s_ms / by_name["student@1"].latency_ms_median
    if not args.no_train:
        result["training_steps_ms"] = training_steps(args, batch, device)
    print_tables(result)
    if args.out:
        text = json.dumps(result, indent=2)
        print(f"wrote {atomic_write(Path(args.out), lambda f: f.write(text), binary=False)}")
    return 0


def training_objective(snapshot_path, device):
    """The stage's training objective rebuilt from the config its snapshot stores (earlier stages inline)."""
    return build(Config.fromstring(load_snapshot(snapshot_path).config, ".py").objective).to(device)


def training_steps(args, batch, device) -> dict:
    big = OccBatch(past=batch.past.repeat(args.train_batch_size, 1, 1, 1, 1),
                   future=batch.future.repeat(args.train_batch_size, 1, 1, 1, 1),
                   ego=batch.ego.repeat(args.train_batch_size, 1, 1, 1), grid=batch.grid,
                   lidar_traj=None if batch.lidar_traj is None else batch.lidar_traj.repeat(args.train_batch_size, 1, 1))
    kw = dict(runs=args.train_runs, warmup=args.train_warmup, device=device)
    out = {"batch_size": args.train_batch_size}
    teacher = training_objective(args.teacher, device)
    out["teacher_fm"] = {**time_training_step(teacher, big, teacher.phase(0), **kw), "nfe": 1}
    if args.student:
        distiller = training_objective(args.student, device)
        name = "mfd" if distiller.kind == "student" else distiller.kind        # MFD's snapshot kind is "student"
        if "aux" in distiller.param_groups():        # aux-free distillers (CD, AYF) have no aux phase to time
            out[f"{name}_aux"] = {**time_training_step(distiller, big, "aux", **kw), "nfe": 2}  # student fwd + aux
        out[f"{name}_student"] = time_training_step(distiller, big, "student", **kw)
    return out


def print_tables(res: dict) -> None:
    d = res["device"]
    print(f"== speed: {d['device']} ({d['device_name']}), {d['dtype']}, {d['threads']} threads, torch {d['torch']}; "
          f"batch 1, {res['protocol']['runs']} runs after {res['protocol']['warmup']} warm-up; median (p90) ms ==")
    stages = ["encode"] + (["prior"] if any("prior" in r["stages_ms"] for r in res["rows"]) else []) \
        + ["sample", "decode", "argmax"]
    print(f"{'row':<28} {'dtype':>8} {'NFE':>4} {'e2e ms':>9} {'p90':>8} {'FPS':>7} "
          + " ".join(f"{s:>8}" for s in stages) + f"  {'×' + res['speedup_reference']:>14}")
    for r in res["rows"]:
        st = r["stages_ms"]
        print(f"{r['name']:<28} {r['dtype']:>8} {r['nfe']:>4} {r['latency_ms_median']:>9.2f} "
              f"{r['latency_ms_p90']:>8.2f} "
              f"{r['fps']:>7.1f} " + " ".join(f"{st[s]:>8.2f}" if s in st else f"{'-':>8}" for s in stages)
              + f"  {res['speedups'][r['name']]:>14.2f}")
    if "student_over_floor" in res:
        print(f"student@1 latency / floor = {res['student_over_floor']:.3f}")
    if "prior" in stages:
        print("(one-shot rows: encode = history + ego-motion prior; +streaming rows: encode = 1 new history frame, "
              "prior = the prior's warp and encode)")
    if "student_streaming_over_floor" in res:
        print(f"student@1+streaming latency / floor = {res['student_streaming_over_floor']:.3f}"
              + (f", / student@1 = {res['student_streaming_over_student']:.3f}"
                 if "student_streaming_over_student" in res else ""))
    for name, t in res.get("training_steps_ms", {}).items():
        if isinstance(t, dict):
            nfe = t.get("nfe_median", t.get("nfe"))
            print(f"train step {name:<12} {t['ms_median']:9.1f} ms (p90 {t['ms_p90']:.1f})  NFE {nfe}")


if __name__ == "__main__":
    sys.exit(main())
