# The released OccFM world model, "fut" variant (planning-conditioned): 12 trajectory rows, up to the
# displacement from the last future frame to the next (3.5 s ahead). Otherwise as teacher_hist.py.
#   torchrun --nproc_per_node=8 tools/train.py configs/occfm_official/teacher_fut.py \
#       --cfg-options data.root=data/occ3d objective.vae_snapshot=work_dirs/occfm_official/fut/vae.pt
_base_ = ["teacher_hist.py"]

objective = dict(vae_snapshot="work_dirs/occfm_official/fut/vae.pt", net=dict(net=dict(trajectory_length=12)))
