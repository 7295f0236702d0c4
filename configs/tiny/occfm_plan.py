# Tiny planning-conditioned OccFM teacher (OccFM's "fut" variant, DOME's setting) on the fine tiny VAE: the future
# ego trajectory is given — as trajectory features (traj_mode="future") and as the current frame warped to each
# given future pose (prior="warp"). Compare it with warp-last, which also knows the future poses, not with cv-warp.
#   python tools/train.py configs/tiny/occfm_plan.py --cfg-options data.root=... objective.vae_snapshot=.../snapshot.pt
_base_ = ["./occfm_ego.py"]

objective = dict(net=dict(traj_mode="future", prior="warp"))
