# Tiny FreeFlow (DISTILLERS.md §9, [UNVERIFIED]: paper note only): data-free flow-map distillation from the prior,
# X(z, t) = z + t·u(z, 0, t). 75 % of each batch: the predictor (∂_t X = v_T(X, t) along the student's own
# trajectory); 25 %: the corrector (VSD on the one-step sample against an aux flow, balanced to the predictor).
# Uses the past (conditions) only, never the future latents.
#   python tools/train.py configs/tiny/freeflow.py \
#       --cfg-options data.root=... objective.teacher_snapshot=.../snapshot.pt
_base_ = ["./mfd.py"]
objective = dict(
    _delete_=True,
    type="occ_mfd.objectives.freeflow.OccFreeFlow",
    teacher_snapshot="work_dirs/occfm/snapshot.pt",
    cfg_scale=None,          # the teacher's sampler CFG (2)
    aux_steps=4, student_steps=1,   # aux:student (the shared benchmark ratio)
    predictor_ratio=0.75,
    norm_k=1.0, norm_eps=0.01,      # predictor weight sg((‖Δ_G‖²/d + ε)^(−k))
    corrector_mean=-1.4, corrector_std=1.0,   # r = sigmoid(N(−1.4, 1)): biased to the noise end
    corrector_weighting="uniform",   # the spec; "r": each corrector sample weighted by r (project option, freeflow.py)
    corrector_time="logit_normal",   # the spec; "uniform": r ~ U(0, 1); both options: VSD's corrector ("freeflow_vsd")
    balance_alpha=1.0, balance_decay=0.9,     # λ = α·E[predictor gradient] / E‖Δ_N‖ (freeflow.py doc)
    jvp="auto", fd_eps=1e-4,
    latent_cache_mb=512,
)
optim = dict(_delete_=True, aux=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0),
             student=dict(lr=3e-4, weight_decay=1e-4, grad_clip=1.0))
