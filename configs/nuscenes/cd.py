# Consistency distillation (one step) at full scale (DISTILLERS.md §5).
_base_ = ["./mfd.py"]
objective = dict(_delete_=True, type="occ_mfd.objectives.cd.OccConsistencyDistillation",
                 teacher_snapshot="work_dirs/occfm/snapshot.pt", cfg_scale=None, grid_steps=20, shift=3.0,
                 target_decay=0.95, huber_c=1e-3)
optim = dict(_delete_=True, student=dict(lr=1e-4, weight_decay=1e-4, grad_clip=1.0))
