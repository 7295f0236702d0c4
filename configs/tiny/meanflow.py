# Tiny MeanFlow distillation (DISTILLERS.md §6): a two-time flow-map student (the teacher + a zero-initialised Δt
# path, occ_mfd/models/flow_map.py) regressed on the MeanFlow identity u = v_T + (t − s)·du/ds with the guided
# teacher's velocity. Needs data (the future latents), no aux flow. Sampled at 1 step (exact) or 2/4 (flow-map jumps).
#   python tools/train.py configs/tiny/meanflow.py \
#       --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.meanflow.OccMeanFlow",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,          # the teacher's sampler CFG (2): the flow map distils the guided field
    norm_p=1.0, norm_eps=0.01,   # adaptive weight sg(1/(‖Δ‖² + ε)^p) (Gsunshine/meanflow)
    warmup_updates=0,        # no tangent warm-up (MeanFlow has none)
    time_sampler="fastgen_endpoint",   # FastGen's MeanFlow distillation times + 25 % at t = 1 (meanflow.py doc);
                             # "meanflow": the official from-scratch sampler, which rarely trains (0, 1)
    jvp="auto",              # torch.func.jvp (fp32, math SDPA), central difference if forward AD fails
    fd_eps=1e-4,
    latent_cache_mb=512,
)
optim = dict(_delete_=True, student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
