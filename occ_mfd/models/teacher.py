"""The OccFM teacher as a training objective: latent flow matching over a frozen occupancy VAE.

``OccFlowTeacher`` is what ``configs/*/occfm.py`` build: it loads the VAE of an earlier stage (by checkpoint
path, or from an inline config when rebuilt from its own checkpoint), builds the forecaster with the VAE's
latent size, and trains it with conditional flow matching (logit-normal t, condition dropout 0.2 for CFG).
``pipeline()`` gives the sampler that ``tools/eval.py`` and ``tools/bench.py`` run (10 Euler steps on the
SD3-shifted grid, α = 3, CFG 2: OccFM's recipe).
"""
from __future__ import annotations

import os
from pathlib import Path

from occ_mfd.engine.builder import build, to_plain
from occ_mfd.flow.fm_objective import FlowMatchingObjective
from occ_mfd.flow.time_sampling import LogitNormalTime
from occ_mfd.models.forecaster import OccForecaster
from occ_mfd.models.vae import OccVAE
from occ_mfd.models.world_model import LatentCodec, OccForecastPipeline, make_prepare


def vae_from_checkpoint_or_config(vae_ckpt: str | os.PathLike | None, vae: OccVAE | dict | None):
    """(VAE, its config dict or None). From a VAE-stage checkpoint (EMA weights) or an inline config/instance.

    The config dict is returned only for the checkpoint case: it is what makes a later checkpoint portable.
    """
    from occ_mfd.engine.checkpoint import load_config_from_checkpoint
    from occ_mfd.models.world_model import load_vae_from_checkpoint

    if (vae_ckpt is None) == (vae is None):
        raise ValueError("give exactly one of vae_ckpt (a VAE-stage checkpoint) or vae (a config/instance)")
    if vae_ckpt is not None:
        path = Path(vae_ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"VAE checkpoint {path} not found: train the VAE stage first "
                                    f"(tools/train.py configs/<scale>/vae.py) or fix objective.vae_ckpt")
        cfg = to_plain(load_config_from_checkpoint(path).objective)
        if "vae" not in cfg:
            raise ValueError(f"checkpoint {path}: its objective ({cfg.get('type')}) has no 'vae'; "
                             f"is it a VAE-stage checkpoint?")
        return load_vae_from_checkpoint(path), cfg["vae"]
    return (build(vae) if isinstance(vae, dict) else vae), None


class OccFlowTeacher(FlowMatchingObjective):
    """OccFM teacher objective.

    Args:
        net: OccForecaster keyword arguments *without* ``latent_channels`` (taken from the VAE).
        vae_ckpt / vae: the frozen VAE: a VAE-stage checkpoint path, or (in stored configs) its config.
        latent_scale: latents are multiplied by this before flow matching (OccFM: 10).
        cond_drop_prob: fraction of samples trained without history/trajectory (CFG); OccFM: 0.2.
        time_mean, time_std: logit-normal training times.
        steps, shift, cfg_scale: the default sampler of :meth:`pipeline`.
    """

    forecaster_kind = "teacher"

    def __init__(self, net: dict, vae_ckpt: str | None = None, vae: dict | OccVAE | None = None,
                 latent_scale: float = 10.0, cond_drop_prob: float = 0.2, time_mean: float = 0.0,
                 time_std: float = 1.0, steps: int = 10, shift: float = 3.0, cfg_scale: float = 2.0):
        vae_model, vae_cfg = vae_from_checkpoint_or_config(vae_ckpt, vae)
        if "latent_channels" in net:
            raise ValueError("objective.net must not set latent_channels: it is the VAE's")
        forecaster = OccForecaster(latent_channels=vae_model.latent_channels, **net)
        super().__init__(forecaster, make_prepare(LatentCodec(vae_model, scale=latent_scale)),
                         time_sampler=LogitNormalTime(time_mean, time_std), cond_drop_prob=cond_drop_prob)
        self.steps, self.shift, self.cfg_scale = int(steps), float(shift), float(cfg_scale)
        self._portable = {"vae_ckpt": None, "vae": vae_cfg} if vae_cfg is not None else {}

    def portable_config(self) -> dict:
        return self._portable

    def pipeline(self) -> OccForecastPipeline:
        """The sampler over this teacher's (EMA, when loaded so) network."""
        return OccForecastPipeline(self.prepare.codec, self.net, steps=self.steps, shift=self.shift,
                                   cfg_scale=self.cfg_scale)
