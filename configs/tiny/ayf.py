# Tiny Align Your Flow (AYF-EMD), one step: an MFD Table 1 baseline (DISTILLERS.md §7, [UNVERIFIED]: no official
# code). The student is a two-time flow map (the teacher + a zero-initialised Δt path, occ_mfd/models/flow_map.py);
# needs data (the future latents), no aux flow.
#   python tools/train.py configs/tiny/ayf.py --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.ayf.OccAlignYourFlow",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,          # the teacher's sampler CFG (2): the flow map distils the guided field
    tangent_c=0.1,           # ĝ = g / (‖g‖ + c) (sCM; FastGen norm_const)
    warmup_updates=16,       # H: r_k = min(1, k/H) on the transport term, 10 % of train.max_steps (160)
    time_sampler="fastgen_endpoint",   # s, t = min, max of two sigmoid(N(0.8, 1.6)), always s < t (FastGen's
                             # distillation recipe) + 25 % at t = 1, the one-step endpoint; "meanflow": the old
                             # sampler (sigmoid(N(0.4, 1)), 25 % at s = t), which never trains (0, 1) (ayf.py doc)
    jvp="auto",              # torch.func.jvp (fp32, math SDPA), central difference if forward AD fails
    fd_eps=1e-4,
)
optim = dict(_delete_=True, student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
