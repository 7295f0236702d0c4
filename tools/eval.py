#!/usr/bin/env python
"""Evaluate forecasters (inference snapshots) and baselines on a prepared dataset: one protocol header, one table.

    python tools/eval.py --data data/synthetic --split val \
        --model runs/teacher/snapshot.pt:steps=10 --model runs/teacher/snapshot.pt:steps=1 \
        --model runs/student/snapshot.pt --baseline copy-last --baseline warp-last \
        --out results.json --csv results.csv --plot curves.png

``--model [NAME=]SNAPSHOT[:steps=N][,cfg=S]`` may repeat (a stage's work dir stands for its snapshot.pt); one
snapshot is loaded once whatever its step counts. Names default to the snapshot's kind (teacher / student /
vsd), suffixed @steps when needed to be unique. Snapshots hold EMA weights.

    torchrun --nproc_per_node=K tools/eval.py --device cuda ...   # the batches dealt to K ranks, same table

Under torchrun each rank forecasts every K-th batch (with its one-process noise) and the confusion matrices are
summed, so the table is that of one process; only rank 0 prints and writes files (the seconds are rank 0's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from occ_mfd.data.sequences import OccSequenceDataset
from occ_mfd.engine import distributed as du
from occ_mfd.eval.baselines import BASELINES, ThroughVAE, VAEReconstruction
from occ_mfd.eval.forecasters import PipelineForecaster, check_compatible, load_forecaster, parse_model_spec
from occ_mfd.eval.report import format_header, format_table, plot_curves, protocol_header, results_dict, \
    write_csv, write_json
from occ_mfd.eval.runner import run_eval
from occ_mfd.models.codec import LatentCodec
from occ_mfd.models.snapshot import load_snapshot
from occ_mfd.models.sparse import SparseUnavailable


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset root (index.json + gts/)")
    p.add_argument("--split", default="val", help="index split to evaluate ('all' for every scene)")
    p.add_argument("--model", action="append", default=[], help="[NAME=]SNAPSHOT[:steps=N][,cfg=S]; repeatable")
    p.add_argument("--baseline", action="append", default=[], choices=sorted(BASELINES))
    p.add_argument("--recon", action="store_true",
                   help="add a 'vae-recon' row: the first model's VAE reconstructing the ground-truth future "
                        "(the ceiling of every forecast through that VAE)")
    p.add_argument("--vae", action="append", default=[], metavar="[NAME=]SNAPSHOT",
                   help="a VAE stage's snapshot: a row (default name 'vae-recon:<its dir>') of its reconstruction of the "
                        "ground-truth future; a tokenizer's ceiling before any forecaster is trained; repeatable")
    p.add_argument("--refiner", metavar="SNAPSHOT",
                   help="a refiner stage's snapshot (configs/tiny/refiner.py): every --model decodes with its ego-motion "
                        "prior refiner; each model's VAE must be the one the refiner was trained on (checked)")
    p.add_argument("--via-vae", action="store_true",
                   help="add a '<baseline>+vae' row per --baseline: its forecast encoded and decoded by the first "
                        "model's VAE (how much of the warp survives the tokenizer)")
    p.add_argument("--out", help="results JSON")
    p.add_argument("--csv", help="results CSV")
    p.add_argument("--plot", help="PNG of IoU/mIoU vs horizon")
    p.add_argument("--dump-forecasts", metavar="DIR", help="write viewer dumps of the first sequences per row")
    p.add_argument("--dump-count", type=int, default=4)
    p.add_argument("--max-sequences", type=int)
    p.add_argument("--mask", default="none", choices=["none", "lidar", "camera"])
    p.add_argument("--past", type=int, default=4)
    p.add_argument("--future", type=int, default=6)
    p.add_argument("--pool", type=int, help="load-time pooling (default: the snapshots' data pool, else 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--allow-convention-mismatch", action="store_true",
                   help="evaluate even when a snapshot's training labels and --data differ in vertical convention "
                        "(lidar vs occ3d, see occ_mfd/data/convention.py)")
    return p.parse_args(argv)


def build_rows(args, device):
    """→ (rows, model protocol dicts, pool). Each snapshot path is loaded once."""
    specs = [parse_model_spec(m) for m in args.model]
    loaded = {}
    for s in specs:
        if s.path not in loaded:
            loaded[s.path] = load_forecaster(s.path, device=device)
    vaes = [vae_row(v) for v in args.vae]
    pools = {info.pool for _, info in loaded.values()} | {pool for _, pool in vaes}
    if len(pools) > 1:
        raise ValueError(f"the snapshots were trained at different pooling factors {sorted(pools)}: "
                         + ", ".join([f"{p}: pool={i.pool}" for p, (_, i) in loaded.items()]
                                     + [f"{r.path}: pool={pool}" for r, pool in vaes]))
    pool = args.pool or (pools.pop() if pools else 1)
    if args.refiner:
        attach_refiner(args.refiner, loaded)
    planned = []
    for s in specs:
        pipeline, info = loaded[s.path]
        planned.append((s, pipeline, info, s.steps or info.steps))
    kinds = [s.name or info.kind for s, _, info, _ in planned]
    rows, models = [], []
    for (s, pipeline, info, steps), kind in zip(planned, kinds):
        name = s.name or (kind if kinds.count(kind) == 1 else f"{kind}@{steps}")
        # Rows are identified by (name, steps), as in the JSON: the same name at other steps is fine.
        while (name, steps) in {(r.name, r.steps) for r in rows}:
            name += "'"
        row = PipelineForecaster(pipeline, name, steps, s.cfg_scale)
        rows.append(row)
        models.append({"name": name, "snapshot": info.path, "kind": info.kind, "steps": steps,
                       "sampler": "flow_map" if info.flow_map else "euler",
                       "shift": row.shift, "cfg_scale": row.effective_cfg, "ema": True,
                       "trained_steps": info.step, "git_rev": info.git_rev,
                       **({"decoder_refiner": args.refiner} if args.refiner else {})})
    rows += [r for r, _ in vaes]
    return rows, models, loaded, pool


def attach_refiner(path: str, loaded: dict) -> None:
    """Give every loaded pipeline the refiner of the refiner-stage snapshot ``path``. The refiner reads the logits of
    the VAE it was trained on, so each model's VAE must have exactly those weights (it does when the teacher was
    trained on the same VAE stage: a refiner can be trained after the teacher)."""
    snap = load_snapshot(path)
    if snap.kind != "vae" or "refiner" not in snap.networks:
        raise ValueError(f"--refiner {path}: not a refiner stage's snapshot (a 'vae' snapshot with a 'refiner' "
                         f"network; it is {snap.kind!r} with {sorted(snap.networks)})")
    for model_path, (pipeline, _) in loaded.items():
        mine = pipeline.codec.vae.state_dict()
        theirs = snap.weights["vae"]
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k].cpu(), theirs[k]) for k in mine):
            raise ValueError(f"--refiner {path} was trained on another VAE than {model_path}'s; train the refiner "
                             f"on the VAE stage that model was trained on")
        try:
            pipeline.attach_refiner(snap.build("refiner").to(next(pipeline.codec.vae.parameters()).device))
        except ValueError as e:
            raise ValueError(f"--refiner {path} with {model_path}: {e}") from e


def vae_row(spec: str):
    """``[NAME=]SNAPSHOT`` of a VAE stage → (its vae-recon row, the pooling its data had)."""
    name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    snap = load_snapshot(path)
    if snap.kind != "vae":
        raise ValueError(f"--vae {path}: a {snap.kind!r} snapshot, not a VAE stage's (give forecasters with --model)")
    row = VAEReconstruction(LatentCodec(snap.build("vae"), scale=1.0, refiner=snap.refiner()))
    row.name = name or f"vae-recon:{Path(snap.path).parent.name}"
    row.path = snap.path
    return row, int(snap.data.get("pool", 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model and not args.baseline and not args.vae:
        print("error: nothing to evaluate: give --model, --baseline and/or --vae", file=sys.stderr)
        return 2
    try:
        du.check_device(args.device)
        info = du.setup(args.device)            # torchrun: join the group (CUDA: cuda:LOCAL_RANK); else nothing
    except (du.DeviceUnavailable, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _main(args, info)
    finally:
        du.teardown(info)


def _main(args, info: du.DistInfo) -> int:
    say = print if info.is_main else (lambda *a, **k: None)
    try:
        if not (Path(args.data) / "index.json").is_file():
            raise FileNotFoundError(f"--data {args.data}: no index.json there (prepare the data first)")
        device = info.device
        rows, models, loaded, pool = build_rows(args, device)
        mask = None if args.mask == "none" else args.mask
        split = None if args.split == "all" else args.split
        dataset = OccSequenceDataset(args.data, split, past=args.past, future=args.future, pool=pool, mask=mask)
        for _, info_ in loaded.values():
            check_compatible(info_, dataset.grid, dataset.index.classes, args.data, args.past, args.future,
                             allow_convention_mismatch=args.allow_convention_mismatch)
        baselines = [BASELINES[b](dataset.grid) for b in dict.fromkeys(args.baseline)]
        rows += baselines
        if (args.recon or args.via_vae) and (not rows or not hasattr(rows[0], "pipeline")):
            raise ValueError(f"{'--recon' if args.recon else '--via-vae'} needs a --model (its VAE is used)")
        if args.via_vae:
            rows += [ThroughVAE(rows[0].pipeline.codec, b) for b in baselines]
        if args.recon:
            rows.append(VAEReconstruction(rows[0].pipeline.codec))
        n = len(dataset) if args.max_sequences is None else min(args.max_sequences, len(dataset))
        protocol = protocol_header(data_root=args.data, split=split, num_sequences=n, grid=dataset.grid,
                                   past=args.past, future=args.future, mask=mask, seed=args.seed, device=device,
                                   batch_size=args.batch_size, models=models, world_size=info.world_size)
        say(format_header(protocol), flush=True)
        results = run_eval(dataset, rows, grid=dataset.grid, batch_size=args.batch_size, seed=args.seed,
                           device=device, max_sequences=args.max_sequences, num_workers=args.num_workers,
                           dump_dir=args.dump_forecasts, dump_count=args.dump_count, progress=info.is_main)
    except (FileNotFoundError, ValueError, RuntimeError, SparseUnavailable) as e:
        print(f"{'' if info.is_main else f'[rank {info.rank}] '}error: {e}", file=sys.stderr)
        return 2
    if not info.is_main:
        return 0
    res = results_dict(protocol, results)
    print()
    print(format_table(res))
    for flag, writer in ((args.out, write_json), (args.csv, write_csv), (args.plot, plot_curves)):
        if flag:
            print(f"wrote {writer(flag, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
