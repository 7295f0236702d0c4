"""Estimate the training memory of the full-scale configs without a GPU.

    python benchmarks/memory.py --model forecaster [--batch 4] [--config configs/nuscenes/occfm.py]
    python benchmarks/memory.py --model vae [--batch 1]

(one model per process: peak RSS is a high-water mark).

Measures, on the CPU in fp32, the peak resident-memory growth of one forward + backward of the config's
networks at the given per-GPU batch, and adds the AdamW + EMA state (4 copies of the trainable parameters:
weights, gradients, two moments; +1 for EMA). The same tensors live on a GPU, so this is an estimate of
per-GPU memory in fp32 (bf16 autocast stores most activations at half size, so it is an upper bound);
CUDA's allocator and workspace add a few hundred MB.
"""
from __future__ import annotations

import argparse
import json
import resource

import torch
from mmengine.config import Config

from occ_mfd.models.forecaster import ForecastCond, OccForecaster
from occ_mfd.models.vae import OccVAE


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("forecaster", "vae"), required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vae-config", default="configs/nuscenes/vae.py")
    ap.add_argument("--config", default="configs/nuscenes/occfm.py")
    args = ap.parse_args()
    torch.manual_seed(0)
    vcfg = {k: v for k, v in Config.fromfile(args.vae_config).objective.vae.items() if k != "type"}
    vcfg["sparse"] = False
    vae = OccVAE(**vcfg)
    ncfg = dict(Config.fromfile(args.config).objective.net)
    net = OccForecaster(latent_channels=vae.latent_channels, **ncfg)
    X = Y = 200
    P, F = ncfg["past"], ncfg["future"]
    h = X // vae.downsample
    out = {"batch": args.batch}
    for name, model, run in (
        ("forecaster", net, lambda: net(torch.randn(args.batch, F, vae.latent_channels, h, h),
                                        torch.rand(args.batch),
                                        ForecastCond(torch.randn(args.batch, P, vae.latent_channels, h, h),
                                                     torch.eye(4).repeat(args.batch, P + F, 1, 1)))),
        ("vae", vae, lambda: vae(torch.randint(0, 18, (args.batch, X, Y, vcfg["grid_z"])))[0]),
    ):
        if name != args.model:
            continue
        n = sum(p.numel() for p in model.parameters())
        before = _rss_mb()
        y = run()
        y.float().square().mean().backward()
        act = max(0.0, _rss_mb() - before)
        state = 5 * n * 4 / 2**20
        out[name] = {"params_M": round(n / 1e6, 2), "activations_fp32_MB": round(act), "optim_ema_MB": round(state),
                     "estimate_GB": round((act + state) / 1024, 2)}
        del y
        model.zero_grad(set_to_none=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
