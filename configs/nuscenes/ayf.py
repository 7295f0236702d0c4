# Align Your Flow (AYF-EMD), one step, at full scale (DISTILLERS.md §7, [UNVERIFIED]). H = 10 % of max_steps, as the
# shared benchmark (sCM uses 10k).
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/ayf.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.ayf.OccAlignYourFlow",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, tangent_c=0.1, warmup_updates=5000,
                 time_sampler="fastgen_endpoint", jvp="auto", fd_eps=1e-4)   # "meanflow": the old sampler (ayf.py)
optim = dict(_delete_=True, student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
