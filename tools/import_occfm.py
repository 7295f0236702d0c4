#!/usr/bin/env python
"""Import a released OccFM checkpoint (Orbis36/OccFM-NeurIPS2025) as occ-mfd snapshots.

    python tools/import_occfm.py --ckpt logs/occfm/2s_3s_nusc_hist_traj/ckpt/epoch=000199.ckpt \
        --config logs/occfm/2s_3s_nusc_hist_traj/occfm.yaml --out work_dirs/occfm_hist [--verify ref.npz]

writes ``OUT/vae.pt`` and (world models) ``OUT/teacher.pt`` (inference snapshots: ``tools/eval.py --model
OUT/teacher.pt:steps=10``, ``tools/bench.py --teacher OUT/teacher.pt``, ``visualize/view.py --model OUT/teacher.pt``,
and ``objective.teacher_snapshot=OUT/teacher.pt`` for the distillers) plus ``OUT/import.json`` (which weights
were used, EMA-vs-raw integer-buffer differences). ``--config`` is the upstream YAML of the run; its
``_BASE_CONFIG_`` includes (``tools/cfgs/...``) are found by walking up from the YAML's folder, so keep a copy of
the upstream ``tools/cfgs/`` tree beside it. Every key and shape is checked before anything is written.

``--verify REF.npz`` (from ``tools/occfm_reference.py``, run where the upstream code is installed) compares our
modules' outputs with the upstream ones on the same inputs; exit status 1 when an error exceeds 1e-4 (nothing
is written then). Exit status 2: bad input (unreadable or mismatching checkpoint, config or reference).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from occ_mfd.models.occfm_official.importer import CheckpointMismatch, import_occfm, write_snapshots
from occ_mfd.models.occfm_official.upstream_config import UpstreamConfigError
from occ_mfd.models.occfm_official.verify import TOLERANCE, load_reference, verify_reference


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="upstream checkpoint (world model or VAE)")
    p.add_argument("--config", required=True, help="the run's upstream YAML (occfm.yaml, occfm_fut.yaml, occfm_vae.yaml)")
    p.add_argument("--out", required=True, help="output folder (vae.pt, teacher.pt, import.json)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="ema_model (default: what the official evaluation uses) or state_dict")
    p.add_argument("--vae-ckpt", help="a separate VAE checkpoint to use instead of the world-model file's VAE")
    p.add_argument("--verify", action="append", default=[], metavar="REF.npz",
                   help="reference outputs of the upstream modules (tools/occfm_reference.py); repeatable")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        imp = import_occfm(args.ckpt, args.config, args.weights, args.vae_ckpt)
        refs = [(r, load_reference(r)) for r in args.verify]
    except (CheckpointMismatch, UpstreamConfigError, FileNotFoundError, ValueError) as e:
        print(f"import_occfm: {e}", file=sys.stderr)
        return 2
    w = imp.weights
    print(f"{args.ckpt}: {'world model (' + imp.variant + ')' if imp.net is not None else 'VAE only'}, "
          f"{w.used} weights" + (f" ({w.note})" if w.note else "") + (f", epoch {w.epoch}" if w.epoch is not None else ""))
    if w.int_buffer_diffs:
        total = sum(w.int_buffer_diffs.values())
        print(f"  EMA vs raw: {len(w.int_buffer_diffs)} integer buffers differ ({total} entries; e.g. "
              f"{next(iter(w.int_buffer_diffs))}): AveragedModel truncates integer buffers. Loaded as stored "
              f"({w.used}).")
    failed = False
    for path, ref in refs:
        errs = verify_reference(ref, imp.vae, imp.net.net if imp.net is not None else None)
        if not errs:
            print(f"  verify {path}: nothing to compare (no part of it matches the imported modules)")
            failed = True
        for name, e in errs.items():
            ok = e <= TOLERANCE
            failed |= not ok
            print(f"  verify {path}: {name:7s} max |Δ| = {e:.3e} {'ok' if ok else f'> {TOLERANCE:g} FAILED'}")
    if failed:
        print("import_occfm: verification failed; nothing written", file=sys.stderr)
        return 1
    provenance = (f"imported by tools/import_occfm.py from {Path(args.ckpt).resolve()} ({w.used} weights) with "
                  f"config {Path(args.config).resolve()}")
    for p in write_snapshots(imp, args.out, provenance):
        print(f"  wrote {p}")
    print(f"  done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
