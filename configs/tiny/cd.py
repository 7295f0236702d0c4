# Tiny consistency distillation, one step: an MFD Table 1 baseline (DISTILLERS.md §5). Needs data (the future
# latents), no aux flow.
#   python tools/train.py configs/tiny/cd.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.cd.OccConsistencyDistillation",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,        # the teacher's sampler CFG (2) in its Euler step
    grid_steps=20, shift=3.0,   # N = 20 on the α = 3 shifted grid
    target_decay=0.95,     # EMA target (LCM, the CD paper)
    huber_c=1e-3,          # pseudo-Huber (LCM's --huber_c)
)
optim = dict(_delete_=True, student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
