# Tiny OccFM teacher with the ego-motion prior (not in OccFM), on the fine tiny VAE (configs/tiny/vae_fine.py,
# 8 × 50 × 50 latents):
# - prior="cv-warp": the latents of the current frame warped to each future frame by the ego motion a constant
#   speed and yaw rate extrapolate from the *past* poses (the cv-warp baseline) enter the network beside x_t, so
#   it learns the residual — moving agents, newly seen space — rather than re-deriving a rigid warp from pose
#   features. Non-privileged: reads no future information.
# - patch=2: 2×2 latent cells per token, so the U-Net runs at 25 × 25 as with the 4× VAE.
#   python tools/train.py configs/tiny/occfm_ego.py --cfg-options data.root=... objective.vae_snapshot=.../snapshot.pt
_base_ = ["./occfm.py"]

# latent_scale: the fine VAE's latents have std ≈ 1.14 on the demo world (0.9 brings them to unit scale).
objective = dict(net=dict(prior="cv-warp", patch=2), latent_scale=0.9)
