# Tiny stabilised MeanFlow distillation, "SMF" (arXiv 2605.17834; DISTILLERS.md §8, [UNVERIFIED]: abstract only).
# Phase A: the guided teacher's Euler mean velocity over [s, t] as the target (no student stop-gradient) for
# K_w student updates; then MeanFlow's differential target + trajectory distribution alignment (DMD2's loss on the
# one-step sample against an aux flow). Needs data; the aux exists only with alignment on.
#   python tools/train.py configs/tiny/smf.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
# Ablations: objective.discrete_updates=0 (no warm-up); objective.align_weight=0 (no alignment: no aux network,
# so the config's optim must have only the student group, as benchmarks/distill_occ.py's smf_no_align does).
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.smf.OccStabilizedMeanFlow",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,          # the teacher's sampler CFG (2)
    discrete_updates=10,     # K_w: 25 % of the 40 student updates below
    switch_loss_ratio=0.1,   # ... or earlier, when the phase-A residual falls below 0.1× its first value
    max_substep=0.1,         # h of the phase-A Euler target (the benchmark's MFD h on occupancy)
    align_weight=1.0,        # λ_TDA (0: no alignment, no aux)
    aux_steps=4, student_steps=1,   # phase B aux:student (the shared benchmark ratio)
    switch_aux_updates=20,   # aux-only updates at the switch
    t_min=0.02, t_max=0.98,  # DMD2's time range for the alignment term
    norm_p=1.0, norm_eps=0.01,
    time_sampler="fastgen_endpoint",
    jvp="auto", fd_eps=1e-4,
    latent_cache_mb=512,
)
optim = dict(_delete_=True, aux=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
# 40 student updates = 10 (phase A) + 20 aux-only + 30 phase-B updates with 4 aux each between them
# (StabilizedMeanFlow.loop_steps(40, 10, 4) = 176); the loss-ratio switch may start phase B earlier.
train = dict(max_steps=176)
