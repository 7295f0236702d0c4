# FreeFlow at full scale (DISTILLERS.md §9, [UNVERIFIED]): data-free predictor (75 %) + corrector (25 %) against an
# aux flow at 4:1.
#   torchrun --nproc_per_node=K tools/train.py configs/nuscenes/freeflow.py \
#       --cfg-options objective.teacher_snapshot=work_dirs/occfm/snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.freeflow.OccFreeFlow",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, aux_steps=4, student_steps=1,
                 predictor_ratio=0.75, norm_k=1.0, norm_eps=0.01, corrector_mean=-1.4, corrector_std=1.0,
                 balance_alpha=1.0, balance_decay=0.9, jvp="auto", fd_eps=1e-4)
optim = dict(_delete_=True, aux=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
