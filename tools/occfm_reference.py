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
    from forecast.models.compressors.occfm_vae import OccFmVAE  # upstream

    vae = OccFmVAE(model_cfg=cfg.MODEL, loss_cfg=cfg.get("LOSS", {})).eval()
    if state is None:
        fill_from_keys(vae)
    else:  # a world-model checkpoint also holds transition_model.*; the VAE keys must all be there
        vae.load_state_dict({k: v for k, v in state.items()
                             if k.split(".", 1)[0] in ("embedding", "encoder", "decoder")}, strict=True)
    mcfg = cfg.MODEL.COMPRESSOR_CONFIG.MODEL
    side, heights = int(mcfg.ENCODER.IMG_SIZE), int(mcfg.EMBEDDING.HEIGHT_NUM)
    occ = torch.randint(0, int(mcfg.EMBEDDING.NUM_CATE), (batch, side, side, heights), generator=gen,
                        dtype=torch.uint8)

    # Encoder: the upstream modules' own forwards; the posterior is the conv output split in halves
    # [μ ‖ log σ²], which is what upstream's VaeQuant does before sampling.
    d = vae.encoder(vae.embedding({"semantic_occ": occ}))
    mu, logvar = d["compressed_features"].chunk(2, dim=1)

    # Decoder + class logits: upstream's nn_forward with the encoder side switched off, fed μ in place of a
    # sample. nn_forward is wrapped by a CUDA timer; call the undecorated function on CPU.
    skipped = (vae.embedding, vae.encoder, vae.quantization)
    for m in skipped:
        m.skip = True
    try:
        nn_forward = type(vae).nn_forward
        if hasattr(nn_forward, "__wrapped__"):
            out = nn_forward.__wrapped__(vae, {"sampled_features": mu})
        else:
            out, _ = nn_forward(vae, {"sampled_features": mu})
    finally:
        for m in skipped:
            m.skip = False
    logits = out["similarity"].permute(0, 4, 1, 2, 3)  # (B, X, Y, Z, K) → (B, K, X, Y, Z)
    return {"occ": occ.numpy(), "mu": mu.numpy(), "logvar": logvar.numpy(),
            "logits": logits.contiguous().numpy()}


def flow_reference(cfg, state: dict | None, batch: int, gen: torch.Generator) -> dict[str, np.ndarray]:
    """Build the upstream flow net from ``cfg``, load ``state`` (or key-derived weights), run it on random inputs.

    Returns ``x``, ``t``, ``traj``, ``v`` (see the module docstring). The batch (``max(batch, 4)`` samples) cycles
    through four cases: t = 0 and t = 731.5 (as the net receives it: ×1000), each with the 6 condition frames
    present and zeroed (upstream's CFG drop zeroes the latents only; the trajectory stays). As in upstream's data,
    the first 2 frames and the first 2 trajectory rows are zero; ``traj`` has 12 rows (a hist net reads the first
    6). Inputs are rounded to multiples of 2⁻⁸ (x) and 2⁻¹⁰ m (traj): exact float32 values that compress."""
    from forecast.models.modules.transition_models import __all__ as flow_nets  # upstream
    from forecast.utils.common_utils import lowercase_keys  # upstream

    section = cfg.get("MODEL", {}).get("TRANSITION_MODEL_CONFIG", {}).get("MODEL", {}).get("TRANSITION_MODEL")
    if section is None:
        raise SystemExit("--part flow: the config has no TRANSITION_MODEL_CONFIG.MODEL.TRANSITION_MODEL (a VAE "
                         "config?); give a world-model config")
    net = flow_nets[section.NAME](**lowercase_keys(section))
    if state is None:
        fill_from_keys(net)             # on the net itself: keys without the world model's "transition_model." prefix
    else:
        prefix = "transition_model."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not sub:
            raise SystemExit(f"--ckpt holds no {prefix} keys (a VAE checkpoint?); --part flow needs a world model's")
        net.load_state_dict(sub, strict=True)
    net.eval()

    n, frames, cond_frames = max(batch, 4), 12, 6
    channels, (h, w) = int(section.IN_CHANNELS), (int(s) for s in section.INPUT_SIZE)
    x = torch.round(torch.randn(n, frames, channels, h, w, generator=gen) * 256) / 256
    x[:, :2] = 0                                                   # upstream zeroes the 2 oldest history frames
    case = torch.arange(n) % 4
    t = torch.where(case % 2 == 0, 0.0, 731.5)
    x[case >= 2, :cond_frames] = 0                                 # CFG's unconditional input
    lateral = torch.randn(n, frames, generator=gen) * 0.3          # x: lateral metres per 0.5 s
    forward = torch.rand(n, frames, generator=gen) * 7.0           # y: forward metres per 0.5 s
    traj = torch.round(torch.stack([lateral, forward], dim=-1) * 1024) / 1024
    traj[:, :2] = 0
    out = net({"noised_sequence": x, "timesteps": t, "trajectory": traj})
    return {"x": x.numpy(), "t": t.numpy(), "traj": traj.numpy(), "v": out["predicted_latent"].numpy()}


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
    meta = {"config": str(args.config), "part": args.part, "seed": args.seed,
            "batch": {k: int(out[k].shape[0]) for k in ("occ", "x") if k in out},
            "weights": (f"{args.ckpt} ({args.weights})" if args.ckpt else "key-derived")}
    out["meta"] = np.array(json.dumps(meta))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **out)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items() if k != "meta"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
