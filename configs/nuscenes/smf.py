# Stabilised MeanFlow distillation ("SMF", arXiv 2605.17834; DISTILLERS.md §8, [UNVERIFIED]) at full scale:
# discrete warm-up for K_w = 25 % of the student updates, then MeanFlow + trajectory distribution alignment.
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/smf.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.smf.OccStabilizedMeanFlow",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None,
                 discrete_updates=2500, switch_loss_ratio=0.1, max_substep=0.02, align_weight=1.0, aux_steps=4,
                 student_steps=1, switch_aux_updates=20, t_min=0.02, t_max=0.98, norm_p=1.0, norm_eps=0.01,
                 time_sampler="fastgen_endpoint", jvp="auto", fd_eps=1e-4)
optim = dict(_delete_=True, aux=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
# 10k student updates: 2500 + 20 + 4 × 7499 aux steps (StabilizedMeanFlow.loop_steps(10_000, 2500, 4) = 40_016).
train = dict(max_steps=40_016)
