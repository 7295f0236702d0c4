# Tiny occupancy VAE with a finer latent grid (not OccFM's 4× tokenizer): 100×100×8 → 8 × 50 × 50 (2× down).
# Why: at 4× (3.2 m latent cells) the tiny VAE loses every small class (pedestrians, cones, bicycles: vae-recon
# mIoU ≈ 30 on the demo), which caps every forecaster decoded through it. At 2× it keeps them, and the forecaster
# pays nothing for the finer grid: it patchifies 2×2 latent cells (configs/tiny/occfm_ego.py, `patch=2`).
#   python tools/train.py configs/tiny/vae_fine.py --cfg-options data.root=work_dirs/demo/occ
_base_ = ["./vae.py"]

objective = dict(vae=dict(channels=(32, 64), downsample=2))
