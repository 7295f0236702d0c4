#!/usr/bin/env python
"""Generate the synthetic world in the nuScenes on-disk format (LIDAR_TOP + lidarseg + boxes + maps).

    python tools/make_synthetic.py --out data/synthetic --version v1.0-synth --scenes 8 --keyframes 40 \
        --sweeps-per-keyframe 2 --seed 0 [--truth] [--workers 2] [--terrain flat|hills]

Load it with ``NuScenes(version="v1.0-synth", dataroot=OUT)``; ``OUT/<version>/splits.json`` holds the
train/val scene lists, ``OUT/truth/`` the exact occupancy (with ``--truth``). ``--terrain hills`` drapes
the town on slopes (grades up to 8 %, ramps, crests, valleys) and writes 2-D ego poses (z, pitch and roll
dropped, like nuScenes) while the LiDAR and the truth see the true 3-D scene; the default stays flat.
"""
from __future__ import annotations

import argparse
import sys

from occ_mfd.data.synthetic.world import make_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataroot to create (must not exist or be empty)")
    p.add_argument("--version", default="v1.0-synth", help="nuScenes version folder name")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--keyframes", type=int, default=40, help="keyframes (2 Hz samples) per scene, ≥ 10")
    p.add_argument("--sweeps-per-keyframe", type=int, default=2,
                   help="LiDAR spins per keyframe interval (passed to the simulator)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", action="store_true", help="also write the exact occupancy under OUT/truth/")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=1, help="processes simulating scenes in parallel")
    p.add_argument("--terrain", choices=["flat", "hills"], default="flat",
                   help="flat ground (default) or hills: slopes up to 8 %%, ego poses written without z/pitch/roll")
    a = p.parse_args(argv)
    try:
        summary = make_world(a.out, version=a.version, scenes=a.scenes, keyframes=a.keyframes,
                             sweeps_per_keyframe=a.sweeps_per_keyframe, seed=a.seed, truth=a.truth,
                             val_fraction=a.val_fraction, workers=a.workers, progress=True, terrain=a.terrain)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
