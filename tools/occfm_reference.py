#!/usr/bin/env python
"""Write reference tensors of the *upstream* OccFM modules, for ``tools/import_occfm.py --verify`` and the goldens.

Not run by CI: it needs a local copy of the upstream code (Orbis36/OccFM-NeurIPS2025; no licence, so it is
imported from where the user keeps it, never copied here) and its Python dependencies (einops, einops_exts,
easydict, pyyaml). Run it with an interpreter that has them, e.g. a throwaway virtual environment:

    python tools/occfm_reference.py --upstream ~/OccFM-NeurIPS2025 \
        --config ~/OccFM-NeurIPS2025/tools/cfgs/occfm.yaml --ckpt epoch=000199.ckpt --out ref_hist.npz
    python tools/import_occfm.py --ckpt epoch=000199.ckpt --config .../occfm.yaml --out imported \
        --verify ref_hist.npz

Without ``--ckpt`` the modules get weights derived from their key names
(:mod:`occ_mfd.models.occfm_official.key_init`): that is how the committed goldens under ``tests/goldens/``
were made from the reduced-size YAMLs there (``--key-derived``), so no upstream code is needed to re-check them.

Output (one ``.npz``; every array in the upstream modules' own layout and units):
- ``occ`` (B, X, Y, Z) uint8, ``mu``/``logvar`` (B, 16, h, w): the encoder's posterior; ``logits``
  (B, 18, X, Y, Z): the decoder's class logits for ``mu``;
- ``x`` (B, 12, C, h, w), ``t`` (B,) as passed to the flow net's forward, ``traj`` (B, n, 2), ``v`` (B, 12, C, h, w);
- ``meta``: a JSON string (config path, parts, weights used, upstream commit when known).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from occ_mfd.models.occfm_official.key_init import fill_from_keys  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, help="root of an upstream OccFM checkout (holds forecast/)")
    p.add_argument("--config", required=True, help="upstream YAML (a world-model config, or a VAE config)")
    p.add_argument("--ckpt", help="upstream checkpoint; without it, key-derived weights")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="which copy of --ckpt to use: ema_model (default, as the official eval) or state_dict")
    p.add_argument("--part", choices=("vae", "flow", "both"), default="both")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npz")
    return p.parse_args(argv)


def import_upstream(root: Path):
    """Put the upstream checkout on sys.path (its modules import each other as ``forecast.*``)."""
    if not (root / "forecast").is_dir():
        raise SystemExit(f"--upstream {root}: no forecast/ package there; point it at the upstream checkout's root")
    sys.path.insert(0, str(root))


def vae_reference(cfg, state: dict | None, batch: int, gen: torch.Generator) -> dict[str, np.ndarray]:
    """Build the upstream VAE from ``cfg``, load ``state`` (or key-derived weights), run it on random occupancy.

    Returns ``occ``, ``mu``, ``logvar``, ``logits`` (see the module docstring)."""
    raise NotImplementedError  # filled in by the VAE port


def flow_reference(cfg, state: dict | None, batch: int, gen: torch.Generator) -> dict[str, np.ndarray]:
    """Build the upstream flow net from ``cfg``, load ``state`` (or key-derived weights), run it on random inputs.

    Returns ``x``, ``t``, ``traj``, ``v`` (see the module docstring)."""
    raise NotImplementedError  # filled in by the flow-net port


def load_state(path: str, weights: str) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt.get("ema_model") if weights == "ema" else ckpt.get("state_dict")
    if sd is None:
        raise SystemExit(f"{path}: no {'ema_model' if weights == 'ema' else 'state_dict'} entry; try --weights "
                         f"{'raw' if weights == 'ema' else 'ema'}")
    return {k.removeprefix("module."): v for k, v in sd.items() if k != "n_averaged"}


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.upstream).expanduser().resolve()
    config = Path(args.config).expanduser().resolve()
    out_path = Path(args.out).expanduser().resolve()  # before the chdir below
    ckpt = str(Path(args.ckpt).expanduser().resolve()) if args.ckpt else None
    import_upstream(root)
    from forecast.config import cfg_from_yaml_file  # upstream
    from easydict import EasyDict

    os.chdir(root)  # upstream opens _BASE_CONFIG_ includes relative to the working directory
    cfg = cfg_from_yaml_file(str(config), EasyDict())
    state = load_state(ckpt, args.weights) if ckpt else None
    gen = torch.Generator().manual_seed(args.seed)
    out: dict[str, np.ndarray] = {}
    torch.set_grad_enabled(False)
    if args.part in ("vae", "both"):
        out.update(vae_reference(cfg, state, args.batch, gen))
    if args.part in ("flow", "both"):
        out.update(flow_reference(cfg, state, args.batch, gen))
    meta = {"config": str(args.config), "part": args.part, "batch": args.batch, "seed": args.seed,
            "weights": (f"{args.ckpt} ({args.weights})" if args.ckpt else "key-derived")}
    out["meta"] = np.array(json.dumps(meta))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if k != "meta"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
