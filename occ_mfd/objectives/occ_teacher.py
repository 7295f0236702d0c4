"""What every distiller of an OccFM teacher starts from, in one place.

:func:`load_occ_teacher` turns the teacher stage's snapshot (or, in stored configs, its description) into the
frozen teacher network, two trainable copies of it (the one-step student and the aux / "fake" flow: the MFD
paper's and DMD2's initialisation), the latent ``prepare`` over the frozen VAE and the teacher's guidance.
:class:`OccStudentStage` gives such an objective its checkpoint portability and its inference snapshot: a
one-step forecaster x1 = x0 + student(x0, t = 0, cond).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from occ_mfd.models.codec import LatentPrepare
from occ_mfd.models.pipeline import ONE_STEP_SAMPLER
from occ_mfd.models.snapshot import InferenceParts, snapshot_or_description


@dataclass
class OccTeacher:
    """teacher: frozen (eval) network; student, aux: trainable copies; prepare: LatentPrepare over the frozen VAE;
    cfg_scale: the teacher's sampler guidance; description: what the student's checkpoints store in place of
    the snapshot path (None when built from a description)."""

    teacher: nn.Module
    student: nn.Module
    aux: nn.Module | None
    prepare: LatentPrepare
    cfg_scale: float
    description: dict | None
    source: tuple[str, dict | None]


def load_occ_teacher(teacher_snapshot: str | None, teacher: dict | None, with_aux: bool = True,
                     latent_cache_mb: float = 0.0) -> OccTeacher:
    """``with_aux=False`` (aux-free distillers, e.g. CD) leaves ``aux`` None; ``latent_cache_mb`` > 0 caches the
    frozen VAE's latents of the training frames (:class:`~occ_mfd.models.latent_cache.LatentCache`)."""
    snap, desc = snapshot_or_description(teacher_snapshot, teacher, "teacher", kinds=("teacher",))
    net = snap.build("net")  # frozen, eval mode
    # Trainable copies (the forecaster has no dropout or batch norm, so train/eval modes do not matter).
    student = copy.deepcopy(net).requires_grad_(True)
    aux = copy.deepcopy(net).requires_grad_(True) if with_aux else None
    return OccTeacher(net, student, aux, LatentPrepare(snap.codec(latent_cache_mb), net.prior, net.residual), float(snap.sampler.cfg_scale), desc,
                      (f"teacher snapshot {snap.path or '(stored description)'}", snap.grid))


class OccStudentStage:
    """Mixin for distillers of an OccFM teacher (after the objective class in the bases): ``portable_config``
    the teacher as its ``source`` and a one-step ``inference_parts``. Needs ``self.kind``, ``self.student``, ``self.prepare`` and
    ``self._portable`` (set with :meth:`_remember`)."""

    def _remember(self, t: OccTeacher) -> None:
        if getattr(self, "student_time", 0.0) != 0.0:
            raise ValueError(f"student_time={self.student_time}: only a jump from t = 0 is a one-step Euler "
                             f"sampler, which is what the student snapshot is evaluated as")
        self._portable = {"teacher_snapshot": None, "teacher": t.description} if t.description is not None else {}
        self._source = t.source

    def portable_config(self) -> dict:
        return self._portable

    def source(self) -> tuple[str, dict | None]:
        return self._source

    def inference_parts(self) -> InferenceParts:
        codec = self.prepare.codec
        return InferenceParts(self.kind, {**codec.networks(), "net": self.student}, latent_scale=codec.scale,
                              sampler=ONE_STEP_SAMPLER)
