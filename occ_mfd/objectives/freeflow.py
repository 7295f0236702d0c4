"""FreeFlow (Tong, Ma, Xie, Jaakkola, arXiv 2511.19428): data-free flow-map distillation by prediction and
correction (``../shared/DISTILLERS.md`` §9).

[UNVERIFIED] Neither the paper text nor code (ShangyuanTong/FreeFlow) was available; this follows DISTILLERS.md §9
(a CVPR-2026 paper note and the survey in ``../shared/papers/``). The student is a flow map from the prior only,
X_θ(z, t) = z + t·u_θ(z, 0, t, c) (s ≡ 0; ``occ_mfd.models.flow_map`` with Δt = t, so it starts as the teacher's
one-step jump). It needs conditions c but **no data**: every point it visits lies on its own trajectories from z.
With t = 0 noise, t = 1 data, each sample of a batch is a predictor sample (probability ``predictor_ratio`` = 0.75)
or a corrector sample:

* Predictor (the Lagrangian identity ∂_t X(z, t) = v(X(z, t), t) along the student's own trajectory):
      t ~ U(0, 1];  (u⁻, ∂_t u⁻) = jvp(u_θ, (z, 0, t), (0, 0, 1))  (no grad);  X⁻ = z + t u⁻
      u_tgt = v_T^w(X⁻, t) − t·∂_t u⁻;   Δ_G = u⁻ − u_tgt = ∂_t X⁻ − v_T^w(X⁻, t)
      L_pred = sg[(‖Δ_G‖²/d + ε)^(−k)]·‖u_θ(z, 0, t) − sg(u_tgt)‖²/d          (k = 1)
* Corrector (VSD on the one-step endpoint, fresh noise):
      x1 = X_θ(z, 1) with grad;  r = sigmoid(N(−1.4, 1)) (biased to noise);  x_r = (1 − r) n + r sg(x1)
      Δ_N = v_A(x_r, r) − v_T^w(x_r, r);   L_corr = λ·⟨sg(Δ_N), x1⟩/d    ⇒ ∂L/∂x1 = λ Δ_N/d: x1 moves along
      v_T − v_A, toward the teacher (the gradient is applied to u_θ(z, 0, 1) with weight 1, not r)
* The aux v_A is a teacher copy trained by flow matching on the student's one-step samples (§0.5), ``aux_steps``
  aux updates per student update (MFD's schedule and aux phase, which this class inherits).
L = mean over the batch of the per-sample L_pred or L_corr.

Decisions where the source is silent [UNVERIFIED]:
* t ~ U(0, 1] for the predictor; r ~ sigmoid(N(−1.4, 1)) (reaches the pure-noise end, as the paper's ablation
  requires); ε = 0.01 (MeanFlow's) in the predictor weight, k = 1.
* Balance: the spec's λ = α·E‖Δ_G‖/(E‖Δ_N‖ + ε) balances the corrector against an *unweighted* predictor. With the
  adaptive weight w = (‖Δ_G‖²/d + ε)^(−k) the predictor's per-sample gradient at u is 2wΔ_G/d, so here
      λ = α·E_pred[2 w ‖Δ_G‖] / (E_corr‖Δ_N‖ + ε_λ),
  which gives the corrector's per-sample gradient at x1 (λΔ_N/d) the mean norm of the predictor's, and reduces to
  the spec's formula (with the factor 2 of the square) for k = 0. Both expectations are EMAs (decay
  ``balance_decay`` 0.9) over updates, so a batch that happens to hold no predictor (or no corrector) sample (batch
  2 on occupancy) still has a λ; α = 1, ε_λ = 1e-8.
* The predictor and corrector samples split one batch at random per sample (not a fixed 3:1 split), so their
  expected shares are right at any batch size.

Options ``corrector_weighting`` and ``corrector_time`` (project decisions, not the spec; the defaults are the spec's):
* ``corrector_weighting="uniform"`` (§9): every r weighs the same, L_corr = λ·⟨sg(Δ_N), x1⟩/d.
  ``"r"``: the per-sample corrector term is weighted by its r, L_corr = λ·r·⟨sg(Δ_N), x1⟩/d, so ∂L/∂x1 = λ r Δ_N/d,
  as VSD's gradient at x1 is t·(v_A − v_T^w) (its x_t carries x1 with weight t); λ's denominator becomes
  E_corr‖r Δ_N‖, so the corrector's mean gradient norm is still the predictor's and only its spread over r changes.
* ``corrector_time="logit_normal"`` (§9): r = sigmoid(N(corrector_mean, corrector_std²)), biased to noise.
  ``"uniform"``: r ~ U(0, 1) (still reaching the pure-noise end, which the paper's ablation requires).
  Both together (study method ``freeflow_vsd``) make the corrector VSD's / Diff-Instruct's: t ~ U(0, 1), weight t.
Why: with CFG the guided velocity near noise (small r) is extrapolated (its mean tends to 2·E[x1|c] − E[x1] at
w = 2), not the velocity of the guided ODE's samples, so a corrector that puts most of its weight near the noise end
pulls the student toward a point that is not the teacher's distribution: the spec's FreeFlow diverges on the
CFG-guided conditional toy (README). Measured there (benchmarks/distill_study.py, seeds 0 1 2, 600 updates, ED to
the guided teacher, initial student 0.71): spec 1.095 ± 0.049, r-weighting alone (``freeflow_rw``) 0.576 ± 0.075,
VSD's corrector (``freeflow_vsd``) 0.047 ± 0.004; on the ring toy 0.0122 ± 0.0075 / 0.0088 ± 0.0050 /
0.0065 ± 0.0021 (within the spread). The defaults stay the spec's: the option is not clearly better on both suites.

Cost per student update (§0.7): 0.75·(guided teacher 2F + J + student 3F) + 0.25·(student 3F + guided teacher 2F +
aux F) + 4F per aux update.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import LinearPath, expand_time, state_dtype
from occ_mfd.models.flow_map import JvpBackend, require_flow_map
from occ_mfd.objectives.ayf import flow_map_student
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.mfd import MeanFlowDistillation
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher


def take_batch(cond: Any, index: torch.Tensor) -> Any:
    """The samples ``index`` (a (K,) long tensor) of every batched tensor in ``cond`` (dim 0), recursing into dicts,
    dataclasses, lists and tuples like :func:`occ_mfd.flow.guidance.repeat_batch`; None / scalars unchanged."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond if cond.ndim == 0 else cond[index]
    if isinstance(cond, dict):
        return {k: take_batch(v, index) for k, v in cond.items()}
    if dataclasses.is_dataclass(cond) and not isinstance(cond, type):
        return dataclasses.replace(cond, **{f.name: take_batch(getattr(cond, f.name), index)
                                            for f in dataclasses.fields(cond) if f.init})
    if isinstance(cond, (list, tuple)):
        out = [take_batch(v, index) for v in cond]
        return out if isinstance(cond, list) else tuple(out)
    return cond


class FreeFlow(MeanFlowDistillation):
    """FreeFlow (see the module doc). ``student``: a :class:`~occ_mfd.models.flow_map.FlowMapEndpoint`, so MFD's
    ``generate`` (z + student(z, 0)) is X_θ(z, 1) and MFD's aux phase trains the aux on it; ``aux``: a velocity net;
    prepare(batch) -> (x_like, cond): x_like gives the shape only (data-free).

    Args: cfg_scale of the teacher; aux_steps, student_steps: the aux:student schedule; predictor_ratio the
    predictor share; norm_k k and norm_eps ε of the predictor weight; corrector_mean / corrector_std of r's
    logit-normal; corrector_weighting "uniform" (the spec) | "r" (each corrector sample weighted by its r) and
    corrector_time "logit_normal" (the spec) | "uniform" (r ~ U(0, 1)): project options, see the module doc;
    balance_alpha α; balance_decay of the λ EMAs; jvp "auto" | "func" | "fd"; fd_eps.
    """

    CORRECTOR_WEIGHTINGS = ("uniform", "r")
    CORRECTOR_TIMES = ("logit_normal", "uniform")

    def __init__(self, teacher: nn.Module, student: nn.Module, aux: nn.Module, prepare: Callable[[Any], tuple], *,
                 cfg_scale: float = 1.0, aux_steps: int = 4, student_steps: int = 1, predictor_ratio: float = 0.75,
                 norm_k: float = 1.0, norm_eps: float = 0.01, corrector_mean: float = -1.4,
                 corrector_std: float = 1.0, corrector_weighting: str = "uniform",
                 corrector_time: str = "logit_normal", balance_alpha: float = 1.0, balance_decay: float = 0.9,
                 jvp: str = "auto", fd_eps: float = 1e-4):
        require_flow_map(student, type(self).__name__)
        if aux is student.flow_map:
            raise ValueError("teacher, student and aux must be distinct modules (deep-copy the teacher)")
        super().__init__(teacher, student, aux, prepare, cfg_scale=cfg_scale, aux_steps=aux_steps,
                         student_steps=student_steps)
        if not 0.0 < predictor_ratio <= 1.0 or norm_k < 0 or norm_eps <= 0 or corrector_std <= 0:
            # predictor_ratio = 0 would train nothing: the corrector's weight λ is balanced against the predictor's
            # gradient, which then never gets a value (λ stays 0).
            raise ValueError(f"need 0 < predictor_ratio <= 1, norm_k >= 0, norm_eps > 0, corrector_std > 0; got "
                             f"{predictor_ratio}, {norm_k}, {norm_eps}, {corrector_std} (a corrector-only run has "
                             "no predictor gradient to balance λ against)")
        if corrector_weighting not in self.CORRECTOR_WEIGHTINGS:
            raise ValueError(f"corrector_weighting must be one of {self.CORRECTOR_WEIGHTINGS}, got "
                             f"{corrector_weighting!r}")
        if corrector_time not in self.CORRECTOR_TIMES:
            raise ValueError(f"corrector_time must be one of {self.CORRECTOR_TIMES}, got {corrector_time!r}")
        if balance_alpha < 0 or not 0.0 <= balance_decay < 1.0:
            raise ValueError(f"need balance_alpha >= 0 and 0 <= balance_decay < 1, got {balance_alpha}, "
                             f"{balance_decay}")
        self.predictor_ratio, self.norm_k, self.norm_eps = float(predictor_ratio), float(norm_k), float(norm_eps)
        self.corrector_mean, self.corrector_std = float(corrector_mean), float(corrector_std)
        self.corrector_weighting, self.corrector_time = corrector_weighting, corrector_time
        self.balance_alpha, self.balance_decay = float(balance_alpha), float(balance_decay)
        self._jvp_backend = JvpBackend(jvp, fd_eps, what="FreeFlow")
        # EMAs of E_pred[2 w ‖Δ_G‖] and E_corr ‖ρ Δ_N‖ (ρ = 1 or r, see corrector_weighting) for λ (NaN: no value
        # yet), checkpointed.
        self.register_buffer("_pred_grad", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("_corr_norm", torch.tensor(math.nan, dtype=torch.float64))

    @property
    def kind(self) -> str:
        return "freeflow"

    @property
    def flow_map(self) -> nn.Module:
        """u_θ(x, s, t, cond, drop_cond): the student's flow map."""
        return self.student.flow_map

    # ---------------------------------------------------------------- pieces
    def _ema(self, buf: torch.Tensor, value: float) -> None:
        buf.fill_(value if math.isnan(float(buf)) else self.balance_decay * float(buf)
                  + (1 - self.balance_decay) * value)

    def balance(self) -> float:
        """λ = α·EMA(E_pred[2 w ‖Δ_G‖]) / (EMA(E_corr‖ρ Δ_N‖) + 1e-8) (ρ: the corrector weight, 1 or r); 0 until
        both have a value."""
        if math.isnan(float(self._pred_grad)) or math.isnan(float(self._corr_norm)):
            return 0.0
        return self.balance_alpha * float(self._pred_grad) / (float(self._corr_norm) + 1e-8)

    def predictor(self, z: torch.Tensor, t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(per-sample L_pred (B,), Δ_G (B, ...), logs) at noise z (B, ...) and end times t (B,)."""
        s = torch.zeros_like(t)
        fn = lambda x_, s_, t_: self.flow_map(x_, s_, t_, cond)  # noqa: E731
        u = self.flow_map(z, s, t, cond).to(z.dtype)                              # u_θ(z, 0, t) with grad
        u_minus, du_dt = self._jvp_backend(fn, (z, s, t), (torch.zeros_like(z), s, torch.ones_like(t)))
        with torch.no_grad():
            u_minus = u.detach() if u_minus is None else u_minus.to(z.dtype)
            X = z + expand_time(t, z) * u_minus                                   # X⁻ = z + t u⁻
            u_tgt = guided(self.teacher, self.cfg_scale)(X, t, cond) - expand_time(t, z) * du_dt.to(z.dtype)
            delta = u_minus - u_tgt                                               # Δ_G = ∂_t X⁻ − v_T(X⁻, t)
            d = delta[0].numel()
            w = (delta.pow(2).flatten(1).sum(1) / d + self.norm_eps).pow(-self.norm_k)     # (B,)
        per = w * (u - u_tgt).pow(2).flatten(1).mean(1)
        # mean over samples of 2 w ‖Δ_G‖: d × the norm of the per-sample gradient 2 w Δ_G / d at u (λ's numerator)
        return per, delta, {"pred_grad": float((2 * w * delta.flatten(1).norm(dim=1)).mean())}

    def corrector_times(self, n: int, device, dtype) -> torch.Tensor:
        """(n,) corrector times: r = sigmoid(N(corrector_mean, corrector_std²)), biased to the noise end (the spec),
        or r ~ U(0, 1) (``corrector_time="uniform"``)."""
        if self.corrector_time == "uniform":
            return torch.rand(n, device=device, dtype=dtype)
        return torch.sigmoid(self.corrector_mean + self.corrector_std * torch.randn(n, device=device, dtype=dtype))

    def corrector(self, z: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(ρ·⟨sg(Δ_N), x1⟩/d per sample (B,), ρ·Δ_N (B, ...)) for x1 = X_θ(z, 1) (with grad); ρ = 1 (uniform, the
        spec) or r (``corrector_weighting="r"``): the second value is d × the per-sample gradient at x1."""
        x1 = self.generate(z, cond).to(z.dtype)
        r = self.corrector_times(z.shape[0], z.device, z.dtype)
        with torch.no_grad():
            x_r = LinearPath().interpolate(torch.randn_like(z), x1.detach(), r)
            diff = guided(self.aux, 1.0)(x_r, r, cond) - guided(self.teacher, self.cfg_scale)(x_r, r, cond)
            if self.corrector_weighting == "r":
                diff = expand_time(r, diff) * diff
        return (diff * x1).flatten(1).mean(1), diff

    # ---------------------------------------------------------------- the loss
    def forward(self, batch, phase: str) -> LossOutput:
        if phase != "student":
            return super().forward(batch, phase)                 # the aux's FM on the student's one-step samples
        x_like, cond = self.prepare(batch)[:2]
        dtype = state_dtype(x_like.dtype)
        B = x_like.shape[0]
        z = torch.randn(x_like.shape, device=x_like.device, dtype=dtype)
        is_pred = torch.rand(B, device=z.device) < self.predictor_ratio
        pred, corr = is_pred.nonzero().flatten(), (~is_pred).nonzero().flatten()
        total = z.new_zeros(())
        logs = {}
        cfg = 1.0 if self.cfg_scale == 1.0 else 2.0
        if len(pred):
            t = 1.0 - torch.rand(len(pred), device=z.device, dtype=dtype)                  # U(0, 1]
            per, delta, plog = self.predictor(z[pred], t, take_batch(cond, pred))
            total = total + per.sum()
            self._ema(self._pred_grad, plog["pred_grad"])                                  # E[2 w ‖Δ_G‖]
            logs.update(pred_loss=per.detach().mean(), delta_g=delta.flatten(1).norm(dim=1).mean())
        if len(corr):
            per_c, diff = self.corrector(z[corr], take_batch(cond, corr))
            self._ema(self._corr_norm, float(diff.flatten(1).norm(dim=1).mean()))
            lam = self.balance()
            total = total + lam * per_c.sum()
            logs.update(corr_lambda=lam, delta_n=diff.flatten(1).norm(dim=1).mean())
        loss = total / B
        p = len(pred) / B
        logs.update(loss=loss.detach(), predictor_share=p, nfe_teacher=cfg, nfe_aux=1.0 - p, nfe_student=1.0,
                    nfe_jvp=2.0 * p)
        return LossOutput(loss=loss, logs=logs)


class OccFreeFlow(OccStudentStage, FreeFlow):
    """FreeFlow of an OccFM teacher into a flow map: what ``configs/*/freeflow.py`` build (snapshot kind
    "freeflow"). Data-free: the training batches give only the conditions (past latents, ego poses).

    Args: teacher_snapshot / teacher; cfg_scale (None: the teacher's sampler CFG); latent_cache_mb; the rest: see
    :class:`FreeFlow`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, aux_steps: int = 4, student_steps: int = 1,
                 predictor_ratio: float = 0.75, norm_k: float = 1.0, norm_eps: float = 0.01,
                 corrector_mean: float = -1.4, corrector_std: float = 1.0, corrector_weighting: str = "uniform",
                 corrector_time: str = "logit_normal", balance_alpha: float = 1.0, balance_decay: float = 0.9,
                 jvp: str = "auto", fd_eps: float = 1e-4, latent_cache_mb: float = 0.0):
        t = load_occ_teacher(teacher_snapshot, teacher, latent_cache_mb=latent_cache_mb)
        super().__init__(t.teacher, flow_map_student(t.student), t.aux, t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale), aux_steps=aux_steps,
                         student_steps=student_steps, predictor_ratio=predictor_ratio, norm_k=norm_k,
                         norm_eps=norm_eps, corrector_mean=corrector_mean, corrector_std=corrector_std,
                         corrector_weighting=corrector_weighting, corrector_time=corrector_time,
                         balance_alpha=balance_alpha, balance_decay=balance_decay, jvp=jvp, fd_eps=fd_eps)
        self._remember(t)
