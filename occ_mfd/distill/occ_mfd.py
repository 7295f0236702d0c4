"""MFD / VSD on the occupancy teacher: what ``configs/*/mfd.py`` and ``configs/*/vsd.py`` build.

The teacher stage's checkpoint gives the frozen teacher network (its EMA weights) and the frozen VAE
(through the teacher's ``prepare``); student and aux flow start as copies of the teacher network
(the paper's initialisation). The student checkpoint evaluates like any forecaster, with one step:
x1 = x0 + student(x0, t = 0, cond) is exactly one Euler step on the uniform grid [0, 1].
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

from occ_mfd.distill.mfd import MeanFlowDistillation
from occ_mfd.engine.builder import to_plain
from occ_mfd.models.world_model import OccForecastPipeline


def _teacher_objective(teacher_ckpt: str | os.PathLike | None, teacher):
    from occ_mfd.engine.checkpoint import build_objective_from_checkpoint, load_config_from_checkpoint

    if (teacher_ckpt is None) == (teacher is None):
        raise ValueError("give exactly one of teacher_ckpt (a teacher-stage checkpoint) or teacher (a config)")
    if teacher is not None:
        return teacher, None
    path = Path(teacher_ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {path} not found: train the teacher stage first "
                                f"(tools/train.py configs/<scale>/occfm.py) or fix objective.teacher_ckpt")
    obj = build_objective_from_checkpoint(path, use_ema=True)
    if not hasattr(obj, "net") or not hasattr(obj, "prepare"):
        raise ValueError(f"checkpoint {path}: objective {type(obj).__name__} is not a flow-matching teacher")
    return obj, to_plain(load_config_from_checkpoint(path).objective)


class OccMeanFlowDistillation(MeanFlowDistillation):
    """MFD of an :class:`~occ_mfd.models.teacher.OccFlowTeacher` into a one-step student.

    Args:
        teacher_ckpt / teacher: the teacher stage's checkpoint path, or (in stored configs) its config.
        cfg_scale: guidance of the teacher inside the student update (None: the teacher's sampler value).
        ode_step, aux_steps, student_steps, r_not_equal_t_ratio, student_time: see
            :class:`~occ_mfd.distill.mfd.MeanFlowDistillation` (r_not_equal_t_ratio = 0 is VSD).
    """

    def __init__(self, teacher_ckpt: str | None = None, teacher=None, cfg_scale: float | None = None,
                 ode_step: float = 0.02, aux_steps: int = 9, student_steps: int = 1,
                 r_not_equal_t_ratio: float = 1.0, student_time: float = 0.0):
        tobj, tcfg = _teacher_objective(teacher_ckpt, teacher)
        net = tobj.net
        super().__init__(net, copy.deepcopy(net), copy.deepcopy(net), tobj.prepare,
                         cfg_scale=float(tobj.cfg_scale if cfg_scale is None else cfg_scale),
                         ode_step=ode_step, aux_steps=aux_steps, student_steps=student_steps,
                         r_not_equal_t_ratio=r_not_equal_t_ratio, student_time=student_time)
        self.forecaster_kind = "vsd" if self.r_not_equal_t_ratio == 0.0 else "student"
        self._portable = {"teacher_ckpt": None, "teacher": tcfg} if tcfg is not None else {}

    def portable_config(self) -> dict:
        return self._portable

    def pipeline(self) -> OccForecastPipeline:
        """One-step sampler over the (EMA, when loaded so) student: no guidance, uniform grid."""
        if self.student_time != 0.0:
            raise ValueError(f"student_time={self.student_time}: only a jump from t = 0 is a 1-step Euler sampler")
        return OccForecastPipeline(self.prepare.codec, self.student, steps=1, shift=1.0, cfg_scale=1.0)
