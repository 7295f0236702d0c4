"""Train any stage (VAE, teacher, distillation) from an mmengine config.

    python tools/train.py CONFIG [--work-dir D] [--cfg-options k=v ...] [--device cpu|cuda] [--max-steps N]
    torchrun --nproc_per_node=K tools/train.py CONFIG ...      # DistributedDataParallel

Running the same command again resumes from ``<work-dir>/latest.pt`` (or, if that cannot be read, from the
newest kept checkpoint that can); a finished run exits 0 at once. SIGTERM or Ctrl-C: the current step
finishes, a checkpoint is written and the command exits with status 143 (``EXIT_PREEMPTED``); a second
signal exits at once. Exit status: 0 finished, 1 error, 143 stopped at a checkpoint (run it again to resume).
With every checkpoint the stage writes ``<work-dir>/snapshot.pt``, the inference snapshot that eval, bench,
the viewer and the next stage load.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmengine.config import Config, DictAction

from occ_mfd.engine.checkpoint import CheckpointUnreadable
from occ_mfd.engine.distributed import DeviceUnavailable, check_device
from occ_mfd.engine.logging import log_to_stdout
from occ_mfd.engine.loop import NonFiniteError, train
from occ_mfd.engine.preempt import EXIT_PREEMPTED
from occ_mfd.models.sparse import SparseUnavailable


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="mmengine pure-Python config file")
    ap.add_argument("--work-dir", help="output folder (default: work_dirs/<config stem>)")
    ap.add_argument("--cfg-options", nargs="+", action=DictAction, default={},
                    help="override config keys, e.g. train.batch_size=4 optim.main.lr=1e-4")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    ap.add_argument("--max-steps", type=int, help="override train.max_steps")
    ap.add_argument("--no-resume", action="store_true", help="start from scratch even if latest.pt exists")
    args = ap.parse_args(argv)

    if not Path(args.config).is_file():
        ap.error(f"config {args.config} does not exist")
    if args.device:
        try:
            check_device(args.device)
        except DeviceUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.max_steps is not None:
        cfg.merge_from_dict({"train.max_steps": args.max_steps})
    log_to_stdout()
    work_dir = args.work_dir or str(Path("work_dirs") / Path(args.config).stem)
    try:
        result = train(cfg, work_dir, device=args.device, resume=not args.no_resume)
    except (NonFiniteError, CheckpointUnreadable, DeviceUnavailable, SparseUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return EXIT_PREEMPTED if result.stopped_by and not result.finished else 0


if __name__ == "__main__":
    sys.exit(main())
