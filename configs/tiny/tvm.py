# Tiny Terminal Velocity Matching, distillation variant (DISTILLERS.md §10, [UNVERIFIED]: no code): a flow-map student
# whose terminal derivative ∂_t X(x_s, s, t) matches the guided teacher's velocity at X, plus the s = t FM term;
# backpropagates through the JVP. Needs data, no aux.
#   python tools/train.py configs/tiny/tvm.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.tvm.OccTerminalVelocityMatching",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,          # the teacher's sampler CFG (2)
    fm_weight=1.0,           # weight of ‖u(x_s, s, s) − v_T(x_s, s)‖²
    time_sampler="gap",      # s, t = min, max of two sigmoid(N(0, 1)) (the paper's gap sampler)
    jvp="auto", fd_eps=1e-4,
    latent_cache_mb=512,
)
# The shared benchmark optimiser; the paper uses AdamW β2 = 0.95 (0.999 oscillated there), as configs/nuscenes/tvm.py.
optim = dict(_delete_=True, student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
