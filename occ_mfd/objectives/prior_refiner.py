"""Training objective of the decoder's ego-motion-prior refiner (:mod:`occ_mfd.models.prior_refiner`) over a frozen VAE.

A stage between the VAE and the teacher: it reads the VAE stage's snapshot, trains only the refiner, and writes a
snapshot of kind ``vae`` holding both (``networks: vae, refiner``), which the teacher stage takes as its
``vae_snapshot`` like any VAE. The encoder and its latents are unchanged, so the refiner can be added to any VAE —
the released OccFM's included — without retraining it.

Per step: for ``frames`` random future frames of each window, the latents of the *true* frame (posterior mean),
perturbed by Gaussian noise of a random scale in [0, ``latent_noise``]·std(latents) — a forecaster's latents are
never exact, and a refiner trained only on exact ones learns to trust them everywhere — are decoded by the frozen
VAE; the refiner corrects those logits with the frame's ego-motion prior (the current frame warped by the
extrapolated ego motion: what inference has). Loss: class-balanced cross-entropy + Lovász-softmax on the refined
logits (:class:`~occ_mfd.models.vae_loss.VAELoss` without its KL term; the point is the small classes).

With ``forecaster_snapshot`` (a trained teacher or student) the latents are instead the *forecaster's* own forecast
of the window (sampled with a step count drawn from ``forecast_steps``): the refiner then learns, on exactly the
inputs it will decode, where a forecast that has drifted from its prior should be trusted and where the prior's
voxels are the better guess — e.g. the small static classes the tokenizer drops, near the current frame. The VAE is
the forecaster's, so the refiner can be attached to it and to every model distilled from it (``tools/eval.py
--refiner``); training it after the teacher is the point.
"""
from __future__ import annotations

import torch
from torch import nn

from occ_mfd.ego_motion import prior_frames
from occ_mfd.models.prior_refiner import PriorRefiner
from occ_mfd.models.pipeline import OccForecastPipeline
from occ_mfd.models.snapshot import InferenceParts, snapshot_or_description
from occ_mfd.models.vae import LatentDist
from occ_mfd.models.vae_loss import VAELoss
from occ_mfd.objectives.base import LossOutput, Objective
from occ_mfd.scores import confusion_matrix, iou_from_confusion


class PriorRefinerObjective(Objective):
    """``forward(batch: OccBatch) -> LossOutput``; trains ``refiner`` (PriorRefiner kwargs without the VAE's
    ``num_classes`` / ``grid_z``) on the frozen VAE of ``vae_snapshot`` (or, in stored configs, its description),
    or on a forecaster's forecasts and VAE (``forecaster_snapshot`` / ``forecaster``; then no ``vae_snapshot``).

    Args: frames: future frames per window the loss decodes; latent_noise: the noise scale of the true-latent mode;
    forecast_steps: the step counts a forecast is sampled with (one drawn per step; the sampler's CFG scale)."""

    def __init__(self, refiner: dict | None = None, vae_snapshot: str | None = None, vae: dict | None = None,
                 frames: int = 2, latent_noise: float = 0.5, loss: VAELoss | None = None,
                 forecaster_snapshot: str | None = None, forecaster: dict | None = None,
                 forecast_steps: tuple[int, ...] = (1,), latent_cache_mb: float = 0.0):
        super().__init__()
        self.forecaster = None
        if forecaster_snapshot is not None or forecaster is not None:
            if vae_snapshot is not None or vae is not None:
                raise ValueError("give the refiner stage either vae_snapshot (true latents) or forecaster_snapshot "
                                 "(the forecaster's VAE and forecasts), not both")
            fsnap, fdesc = snapshot_or_description(forecaster_snapshot, forecaster, "forecaster",
                                                   kinds=("teacher", "student"))
            if "refiner" in fsnap.networks:
                raise ValueError(f"forecaster snapshot {fsnap.path or '(description)'} decodes with a refiner "
                                 f"already; give one trained on the VAE stage's snapshot")
            if not forecast_steps or any(int(k) < 1 for k in forecast_steps):
                raise ValueError(f"forecast_steps must be step counts ≥ 1, got {forecast_steps}")
            self.forecaster = OccForecastPipeline(fsnap.codec(latent_cache_mb), fsnap.build("net"), fsnap.sampler)
            self.forecast_steps = tuple(int(k) for k in forecast_steps)
            snap, desc, what = fsnap, fdesc, "forecaster"
        else:
            snap, desc = snapshot_or_description(vae_snapshot, vae, "vae", kinds=("vae",))
            what = "vae"
            if "refiner" in snap.networks:
                raise ValueError(f"vae snapshot {snap.path or '(description)'} has a refiner already; give the VAE "
                                 f"stage's snapshot")
        refiner = dict(refiner or {})
        for k in ("num_classes", "grid_z"):
            if k in refiner:
                raise ValueError(f"objective.refiner must not set {k}: it is the VAE's")
        if frames < 1 or latent_noise < 0:
            raise ValueError(f"frames must be ≥ 1 and latent_noise ≥ 0, got {frames}, {latent_noise}")
        # frozen, eval mode; with a forecaster, the very module its pipeline decodes with
        self.vae = self.forecaster.codec.vae if self.forecaster is not None else snap.build("vae")
        self.refiner = PriorRefiner(num_classes=self.vae.num_classes, grid_z=self.vae.grid_z, **refiner)
        self.frames, self.latent_noise = int(frames), float(latent_noise)
        self.loss = loss or VAELoss(kl_weight=0.0, class_balance=True)
        self._portable = {f"{what}_snapshot": None, what: desc} if desc is not None else {}
        self._source = (f"{'VAE' if what == 'vae' else 'forecaster'} snapshot {snap.path or '(stored description)'}",
                        snap.grid)

    def train(self, mode: bool = True):      # the frozen VAE (and forecaster) stay in eval mode
        super().train(mode)
        self.vae.eval()
        if self.forecaster is not None:
            self.forecaster.eval()
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": list(self.refiner.parameters())}

    def ema_modules(self) -> dict[str, nn.Module]:
        return {"refiner": self.refiner}

    def portable_config(self) -> dict:
        return self._portable

    def source(self) -> tuple[str, dict | None]:
        return self._source

    def inference_parts(self) -> InferenceParts:
        return InferenceParts("vae", {"vae": self.vae, "refiner": self.refiner})

    def forward(self, batch, phase: str = "main") -> LossOutput:
        if getattr(batch, "grid", None) is None:
            raise ValueError("PriorRefinerObjective warps voxels and needs the batch's grid (OccSequenceDataset sets it)")
        B, F = batch.future.shape[:2]
        pick = torch.stack([torch.randperm(F, device=batch.future.device)[: self.frames] for _ in range(B)])  # (B, n)
        rows = torch.arange(B, device=pick.device)[:, None]
        with torch.no_grad():
            prior = prior_frames(batch.past, batch.ego, batch.grid, self.refiner.prior)[rows, pick].flatten(0, 1)
            target = batch.future[rows, pick].flatten(0, 1).long()                             # (B·n, X, Y, Z)
            if self.forecaster is None:
                z = self.vae.encode(target).mean                                                # (B·n, C, H, W)
                scale = torch.rand(z.shape[0], 1, 1, 1, device=z.device) * self.latent_noise * z.std()
                z = z + scale * torch.randn_like(z)
            else:
                z = self._forecast(batch)[rows, pick].flatten(0, 1)                             # (B·n, C, H, W)
            logits = self.vae.decode(z)                                                         # (B·n, K, X, Y, Z)
        refined = self.refiner(logits, prior)
        # VAELoss with a zero KL weight (the VAE is frozen): its dist argument is a dummy.
        terms = self.loss(refined, target, LatentDist(z[:, :1], torch.zeros_like(z[:, :1])))
        logs = {"ce": terms.ce, "lovasz": terms.lovasz}
        with torch.no_grad():
            # the refiner's gain on this batch, as fractions, beside the decoding it refines and its prior alone
            for name, pred in (("", refined.argmax(dim=1)), ("vae_", logits.argmax(dim=1)), ("prior_", prior)):
                conf = confusion_matrix(pred, target, self.vae.num_classes)
                iou, _, miou = iou_from_confusion(conf.cpu(), self.vae.free_id)
                logs[f"{name}recon_iou"], logs[f"{name}recon_miou"] = iou / 100, miou / 100
        return LossOutput(terms.total, logs)

    def _forecast(self, batch) -> torch.Tensor:
        """The forecaster's unscaled latents of the window's future, (B, F, C, H, W), at a drawn step count."""
        f = self.forecaster
        cond = f.codec.condition(batch, getattr(f.net, "prior", None))
        steps = self.forecast_steps[int(torch.randint(len(self.forecast_steps), ()))]
        return f.sample(cond, f.noise(cond), steps) / f.codec.scale
