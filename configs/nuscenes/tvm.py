# Terminal Velocity Matching, distillation variant, at full scale (DISTILLERS.md §10, [UNVERIFIED]). AdamW β2 = 0.95
# as the paper (0.999 oscillated there). The most expensive of the family (backward through the JVP).
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/tvm.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.tvm.OccTerminalVelocityMatching",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, fm_weight=1.0, time_sampler="gap",
                 jvp="auto", fd_eps=1e-4)
optim = dict(_delete_=True, student=dict(lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.95), grad_clip=1.0))
