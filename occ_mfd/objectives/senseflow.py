"""SenseFlow (Ge et al., arXiv 2506.00523), one step: an MFD Table 1 baseline on DMD2's contract.

SenseFlow = DMD2's distribution-matching generator loss + Intra-Segment Guidance (ISG) + Implicit Distribution
Alignment (IDA) + a VFM discriminator. Following ``../shared/DISTILLERS.md`` §3 and the authors' trainers
(XingtongGe/SenseFlow @f7da31b, ``senseflow/trainer/trainer_*senseflow.py``: ``get_isg_guidance``, ``ida_w``),
in our convention (t = 0 noise, t = 1 data), for a one-step generator G(z) = z + net(z, 0):

* L_DM: DMD2's loss, reused from :class:`~occ_mfd.objectives.dmd2.DistributionMatchingDistillation` (aux = the
  "fake" flow trained by FM on student samples, fake:generator 4:1, the shared benchmark ratio of §12).
* ISG, one-step form (one segment [0, 1]): t_mid ~ U(δ, 1 − δ); without grad, the guided teacher takes one Euler
  step x_mid = z + t_mid·v_T^w(z, 0) and the *student* finishes the segment, y = x_mid + (1 − t_mid)·net(x_mid,
  t_mid); then L_ISG = mean(√((G(z) − y)² + c²) − c), elementwise pseudo-Huber, c = 1e-3. It ties the student's
  one jump to "teacher for a while, then student", i.e. makes the student's own field at t_mid consistent with
  the teacher's at 0. Checked against the authors' code (signs after the σ = 1 − t conversion, teacher with CFG
  at the segment start, the *live* student at t_mid, pseudo-Huber mean next to DMD2's per-sample-normalised DM
  loss, which is the authors' scale too). [Measured, a property of the one-segment form, not a bug] With one
  segment [0, 1] (the authors' generators have 4 short ones) the target is a two-step Euler sample while the
  student's field at t_mid is still the teacher's (it is trained only at t = 0), and → the teacher's one-step jump
  as t_mid → 1: on the toy ring its ED is ≥ 0.17 for every t_mid (1.34 at 0.95; the initial student 1.37), the
  per-element ISG gradient (≈ 1, sign-like) stays as large as DM's (0.6–1) and opposes it (cosine −0.4), and the
  student plateaus at ED 0.17 (DMD2 0.006; λ_ISG 0.5 / 0.1 / 0: 0.038 / 0.009 / 0.002, seed 0).
  tests/test_senseflow.py has the closed form on a Gaussian (target 0.2 z for the exact σ z, σ = 0.5, t_mid = 0.5).
* L = L_DM + λ_ISG·L_ISG. λ_ISG = 1: the authors' SD3.5 trainer adds the ISG loss unweighted
  (``generator_loss += isg_guidance_loss``) next to ``ida_w = 0.97`` and a ±50/1000 mid-step margin (δ = 0.05).
  DISTILLERS.md §3 lists 0.5 for SD3.5 and 1.0 for FLUX; [UNVERIFIED which the paper's Table uses] — we take the
  code's 1.0 (a config key, ``isg_weight``).
* IDA: after each generator (student) update, aux ← λ·aux + (1 − λ)·student over parameters matched by name
  (both are teacher copies), λ = 0.97 (the authors' FLUX / SD3.5 trainers; 0.98 in the paper's SD3.5-M text).
  It is a post-step parameter edit, which ``after_backward`` must not do (it runs before the optimiser step and
  must not change gradients): it is applied lazily at the start of the next ``forward`` (DISTILLERS.md §0.8;
  nothing reads the aux in between, so this is the same update), and the persistent buffer ``_ida_pending``
  keeps it exact across a checkpoint/resume. A skipped (non-finite) step still gets its IDA on the next forward,
  with the unchanged student (as CD's target EMA). λ = 1 disables IDA (the authors' ``if ida_w != 1.0``).

What does not transfer (so it is not implemented):
* The VFM discriminator: SenseFlow's GAN is a frozen DINOv2 ViT-L/14 (+ CLIP text features) with trainable
  heads, on *decoded RGB images*. There is no pretrained vision foundation model for 3-D semantic occupancy
  latents, and its weight is ω = (1 − σ)² (``timew = (1 - sigmas) ** 2``), which is exactly 0 at a one-step
  generator's pure-noise anchor (σ = 1 in the authors' convention, t = 0 in ours; DISTILLERS.md F5), so even a
  VFM would contribute nothing to this loss.
* The random teacher CFG per step (w ~ U(2, 8) / U(2, 4)) — the benchmark distils one fixed guided teacher — and
  backward simulation (it is for multi-step students).

Cost per student update (DISTILLERS.md §0.7): student fwd + bwd 3F, DM teacher 2F + fake F, ISG teacher 2F +
no-grad student F = 9F; IDA is O(#params).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from occ_mfd.flow.guidance import guided
from occ_mfd.flow.path import expand_time
from occ_mfd.objectives.base import LossOutput
from occ_mfd.objectives.dmd2 import DistributionMatchingDistillation
from occ_mfd.objectives.occ_teacher import OccStudentStage, load_occ_teacher


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """mean(√(diff² + c²) − c) over all elements (c = 0: mean squared error)."""
    return ((diff.pow(2) + c * c).sqrt() - c).mean() if c else diff.pow(2).mean()


class SenseFlowDistillation(DistributionMatchingDistillation):
    """DMD2 generator loss + ISG + IDA (see the module doc); schedule, groups, EMA and the fake flow's FM are DMD2's.

    Args (besides DMD2's): isg_weight λ_ISG (0: no ISG), isg_delta δ (t_mid ~ U(δ, 1 − δ)), isg_huber_c c,
    ida_decay λ (1: no IDA). The student and aux must have the same parameter names (teacher copies).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, aux: nn.Module, prepare: Callable[[Any], tuple],
                 *, cfg_scale: float = 1.0, aux_steps: int = 4, student_steps: int = 1, t_min: float = 0.02,
                 t_max: float = 0.98, student_time: float = 0.0, isg_weight: float = 1.0, isg_delta: float = 0.05,
                 isg_huber_c: float = 1e-3, ida_decay: float = 0.97):
        super().__init__(teacher, student, aux, prepare, cfg_scale=cfg_scale, aux_steps=aux_steps,
                         student_steps=student_steps, t_min=t_min, t_max=t_max, student_time=student_time)
        if student_time != 0.0:
            raise ValueError(f"student_time={student_time}: SenseFlow's one-step ISG segment is [0, 1]")
        if not 0.0 < isg_delta < 0.5 or isg_weight < 0 or isg_huber_c < 0:
            raise ValueError(f"need 0 < isg_delta < 0.5, isg_weight >= 0, isg_huber_c >= 0; got {isg_delta}, "
                             f"{isg_weight}, {isg_huber_c}")
        if not 0.0 <= ida_decay <= 1.0:
            raise ValueError(f"ida_decay (SenseFlow's ida_w) must be in [0, 1], got {ida_decay}")
        self.isg_weight, self.isg_delta, self.isg_huber_c = float(isg_weight), float(isg_delta), float(isg_huber_c)
        self.ida_decay = float(ida_decay)
        if self.ida_decay < 1.0:
            self._ida_pairs()            # fail at construction, not at the first update, if the names differ
        # True once a student forward ran: its optimiser step is then pending for IDA (kept in checkpoints).
        self.register_buffer("_ida_pending", torch.tensor(False))

    @property
    def kind(self) -> str:
        return "senseflow"

    # ---------------------------------------------------------------- IDA
    def _ida_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(aux param, student param) matched by name, for every trainable student parameter (the authors' loop)."""
        aux = dict(self.aux.named_parameters())
        pairs = []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            if name not in aux or aux[name].shape != p.shape:
                raise ValueError(f"IDA matches parameters by name: student parameter {name!r} "
                                 f"{tuple(p.shape)} has no aux counterpart of that shape (aux and student must be "
                                 f"copies of the same network)")
            pairs.append((aux[name], p))
        return pairs

    @torch.no_grad()
    def ida_update(self) -> None:
        """aux ← λ·aux + (1 − λ)·student (SenseFlow's IDA; applied lazily, see the module doc)."""
        for p_aux, p in self._ida_pairs():
            p_aux.lerp_(p.detach().to(p_aux.dtype), 1.0 - self.ida_decay)

    # ---------------------------------------------------------------- ISG
    def intra_segment_guidance(self, z: torch.Tensor, x1: torch.Tensor, cond: Any,
                               t_mid: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """L_ISG for noise z (B, ...) and its one-step sample x1 = G(z) (with grad); t_mid (B,) None: U(δ, 1 − δ)."""
        B = z.shape[0]
        if t_mid is None:
            t_mid = self.isg_delta + (1 - 2 * self.isg_delta) * torch.rand(B, device=z.device, dtype=z.dtype)
        with torch.no_grad():
            zero = torch.zeros(B, device=z.device, dtype=z.dtype)
            x_mid = z + expand_time(t_mid, z) * guided(self.teacher, self.cfg_scale)(z, zero, cond)  # teacher to t_mid
            y = x_mid + expand_time(1 - t_mid, z) * guided(self.student, 1.0)(x_mid, t_mid, cond)  # student to 1
        loss = pseudo_huber(x1 - y, self.isg_huber_c)
        return loss, {"isg_loss": loss.detach(), "isg_t_mid": t_mid.mean()}

    # ---------------------------------------------------------------- the loss
    def forward(self, batch, phase: str) -> LossOutput:
        if bool(self._ida_pending):
            if self.ida_decay < 1.0:
                self.ida_update()
            self._ida_pending.fill_(False)
        if phase != "student":
            return super().forward(batch, phase)                       # the fake flow's FM on student samples
        self._ida_pending.fill_(True)
        z, x1, cond, dm, logs = self.generator_step(batch)
        loss = dm
        nfe_teacher = 1.0 if self.cfg_scale == 1.0 else 2.0
        logs = {**logs, "dm_loss": dm.detach(), "nfe_student": 1.0}
        if self.isg_weight:
            isg, isg_logs = self.intra_segment_guidance(z, x1, cond)
            loss = dm + self.isg_weight * isg
            logs.update(isg_logs, nfe_teacher=2 * nfe_teacher, nfe_student=2.0)  # + ISG teacher step, student finish
        logs["loss"] = loss.detach()
        return LossOutput(loss=loss, logs=logs)


class OccSenseFlow(OccStudentStage, SenseFlowDistillation):
    """SenseFlow of an OccFM teacher into a one-step student: what ``configs/*/senseflow.py`` build.

    Args: teacher_snapshot / teacher (the teacher stage's snapshot or its stored description); cfg_scale (None: the
    teacher's sampler CFG); the rest: see :class:`SenseFlowDistillation` and :class:`DistributionMatchingDistillation`.
    """

    def __init__(self, teacher_snapshot: str | None = None, teacher: dict | None = None,
                 cfg_scale: float | None = None, aux_steps: int = 4, student_steps: int = 1, t_min: float = 0.02,
                 t_max: float = 0.98, isg_weight: float = 1.0, isg_delta: float = 0.05, isg_huber_c: float = 1e-3,
                 ida_decay: float = 0.97):
        t = load_occ_teacher(teacher_snapshot, teacher)
        super().__init__(t.teacher, t.student, t.aux, t.prepare,
                         cfg_scale=t.cfg_scale if cfg_scale is None else float(cfg_scale), aux_steps=aux_steps,
                         student_steps=student_steps, t_min=t_min, t_max=t_max, isg_weight=isg_weight,
                         isg_delta=isg_delta, isg_huber_c=isg_huber_c, ida_decay=ida_decay)
        self._remember(t)
