#!/usr/bin/env python
"""Look at occupancy sequences and forecasts, in a window or headless.

  python visualize/view.py --data data/synthetic                       # first val sequence, window
  python visualize/view.py --data O --scene scene-0103 --token TOKEN   # window ending at TOKEN
  python visualize/view.py --forecast dumps/seq_000.npz --render out.gif --camera bev   # headless
  xvfb-run -a python visualize/view.py --data data/synthetic           # window on a virtual display

Keys: ←/→ step in time · space play/pause · 1–4 past / GT future / prediction / error · C cycle a class
filter · B bird's-eye / chase camera · S save a screenshot (occ_view_NNN.png in the working directory) ·
H print the help. The window title says which view and time are shown.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from occ_mfd.engine.logging import log_to_stdout  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="prepared dataset root (index.json + gts/)")
    src.add_argument("--forecast", help="a forecast dump .npz from tools/eval.py --dump-forecasts")
    p.add_argument("--model",
                   help="inference snapshot to run on the chosen --data sequence: SNAPSHOT[:steps=N][,cfg=S]")
    p.add_argument("--device", default="cpu", help="device for --model (e.g. cuda)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --model")
    p.add_argument("--scene", help="scene name (default: the first scene of the split)")
    p.add_argument("--token", help="sample token of the current (last observed) frame")
    p.add_argument("--split", default="val", help="split to take sequences from (default: val)")
    p.add_argument("--past", type=int, default=4)
    p.add_argument("--future", type=int, default=6)
    p.add_argument("--render", help="headless output: out.png | out.gif | out.mp4 (no window)")
    p.add_argument("--camera", choices=("bev", "chase"), default="chase")
    p.add_argument("--backend", choices=("auto", "open3d", "bev"), default="auto",
                   help="headless renderer: Open3D offscreen, the bird's-eye fallback, or auto")
    p.add_argument("--views", default=None, help="comma-separated subset of past,gt,pred,error")
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--size", default=None,
                   help="WxH in pixels: each panel with --render (default 480x360), else the window (1280x800)")
    return p.parse_args(argv)


def load_model(args):
    """--model → (forecaster, info) through the evaluation's loader (occ_mfd.eval.forecasters)."""
    from occ_mfd.eval.forecasters import PipelineForecaster, load_forecaster, parse_model_spec

    spec = parse_model_spec(args.model)
    pipeline, info = load_forecaster(spec.path, device=args.device)
    fc = PipelineForecaster(pipeline, spec.name or info.kind, spec.steps or info.steps, spec.cfg_scale)
    args.past, args.future = info.past, info.future
    return fc, info


def load_record(args):
    from occ_mfd.viz.forecast_io import ForecastRecord, load_forecast

    if args.forecast:
        return load_forecast(args.forecast)
    from occ_mfd.data.sequences import OccSequenceDataset

    model = load_model(args) if args.model else None
    pool = model[1].pool if model else 1
    ds = OccSequenceDataset(args.data, split=args.split, past=args.past, future=args.future, pool=pool, mask=None)
    for i, (si, start) in enumerate(ds.windows):
        scene = ds.index.scenes[si]
        if args.scene and scene.name != args.scene:
            continue
        if args.token and scene.frames[start + args.past - 1].token != args.token:
            continue
        seq = ds[i]
        pred, name = None, "ground truth"
        if model is not None:
            pred, name = run_model(model, seq, ds, args)
        return ForecastRecord(seq.past, seq.future, pred, seq.ego, ds.grid, name, seq.scene, list(seq.tokens))
    raise ValueError(f"{args.data}: no {args.past}+{args.future}-frame window in split {args.split!r}"
                     + (f" of scene {args.scene!r}" if args.scene else "")
                     + (f" whose current frame is {args.token!r}" if args.token else ""))


def run_model(model, seq, ds, args):
    """One forecast of ``seq`` → ((F, X, Y, Z) uint8, row name)."""
    import torch

    from occ_mfd.data.records import collate_sequences
    from occ_mfd.eval.forecasters import check_compatible

    fc, info = model
    check_compatible(info, ds.grid, list(ds.index.classes), args.data, args.past, args.future)
    batch = collate_sequences([seq]).to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        out = fc(batch, generator=gen)
    return out.classes[0].cpu().numpy().astype("uint8"), f"{fc.name}@{fc.steps}"


def parse_size(text: str) -> tuple[int, int]:
    """Parse "WxH" → (W, H), both positive."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError("expected WxH, e.g. 640x480") from None
    if w <= 0 or h <= 0:
        raise ValueError("width and height must be positive")
    return w, h


def main(argv=None) -> int:
    args = parse_args(argv)
    log_to_stdout()       # the library's messages (viewer keys and help, renderer notices) as plain lines
    for flag in ("forecast", "data", "model"):
        v = getattr(args, flag)
        if flag == "model" and v:
            v = v.split(":")[0].split(",")[0].split("=")[-1]      # [NAME=]SNAPSHOT[:steps=N][,cfg=S]
        if v and not Path(v).exists():
            print(f"error: --{flag} {v}: no such file or directory", file=sys.stderr)
            return 2
    if args.model and not args.data:
        print("error: --model needs --data (the sequence to forecast)", file=sys.stderr)
        return 2
    try:
        size = parse_size(args.size or ("480x360" if args.render else "1280x800"))
    except ValueError as e:
        print(f"error: --size {args.size}: {e}", file=sys.stderr)
        return 2
    if not args.render:                   # before loading (a --model run can take a while): can a window open?
        from occ_mfd.viz.x11 import display_problem

        problem = display_problem()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        rec = load_record(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:          # the model pipeline is another module's; say what is missing
        print(f"error: --model needs the evaluation's model loader (occ_mfd.eval.forecasters): {e}",
              file=sys.stderr)
        return 2
    if args.render:
        from occ_mfd.viz.render import make_renderer, render_sequence, save_animation

        w, h = size
        views = args.views.split(",") if args.views else None
        t0 = time.perf_counter()
        with make_renderer(args.backend, w, h) as r:
            frames = render_sequence(rec, r, camera=args.camera, views=views)
            if Path(args.render).suffix.lower() == ".png" and len(frames) > 1:
                frames = frames[-1:]            # a still: the last future frame (all panels filled)
            try:
                path = save_animation(frames, args.render, fps=args.fps)
            except (RuntimeError, ValueError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        print(f"wrote {path} ({len(frames)} frame(s), {r.name} renderer, {time.perf_counter() - t0:.1f} s)")
        return 0
    from occ_mfd.viz.viewer import run_viewer

    try:
        run_viewer(rec, width=size[0], height=size[1])
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
