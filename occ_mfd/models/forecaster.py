"""OccFM-style latent velocity network (arXiv 2506.23434 §3.2), 2+1-D U-Net over the latent sequence.

Input sequence = [past latents ; noisy future x_t] along time, (B, P+F, C, H, W) (history in-context).
3-D conv stem → down levels (time-conditioned residual blocks, then spatial + temporal adaLN-Zero DiT
blocks where ``attn_levels`` says) with stride-2 spatial downsampling → mid block → mirrored up path
with skips → velocity for every frame; the future F frames are returned.

Conditioning vector = MLP(sinusoid(1000·t)) + MLP(Fourier(ego xy, yaw)) of the past frames
(``traj_mode="past"``) or of all frames (``"future"``: planning-conditioned, as OccFM's fut variant and
DOME). ``drop_cond`` (B,) bool replaces the history by zeros *and* removes the trajectory term for those
samples (condition dropout for classifier-free guidance).

``prior`` ("cv-warp" | "warp", issue: a teacher that forecasts): the latents of the current frame warped to each
future frame by the ego motion (extrapolated from the past poses, or the given future poses) enter the stem
beside x_t. The dominant change of a driving scene is the ego's own motion; with the warp given, the network
learns the residual (moving agents, newly seen space) instead of re-deriving a rigid warp from pose features.
``residual=True`` goes one step further: the flow generates future − prior latents (what the warp gets wrong),
and ``prediction="data"`` makes the network output the data estimate x̂1 and returns the velocity it implies,
v = (x̂1 − x_t) / (1 − t) (1 − t clamped at :data:`DATA_PRED_MIN_GAP`; x-prediction as in Li & He 2025,
"Back to Basics: Let Denoising Generative Models Denoise"). Together, a net that outputs 0 (an untrained
one: the output layer starts at zero) predicts
a zero residual and the sampler returns the warp itself at any step count; training then only has to learn what
the warp gets wrong. (With a velocity output, 0 means "keep the noise": the net must first learn v ≈ −n exactly
before the prior shows through, which 400 CPU steps do not achieve.)

Sizes (measured): full scale ``OccForecaster(16, 4, 6, base_channels=80, channel_mult=(1, 2, 4),
num_res_blocks=2, attn_levels=(1, 2), heads=5)`` on 16×50×50 latents = 28.06 M parameters (OccFM ≈ 30 M);
tiny ``OccForecaster(8, 4, 6, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(1,),
heads=4)`` on 8×25×25 latents = 1.04 M.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from occ_mfd.ego_motion import PRIORS
from occ_mfd.models.blocks import SpatialAttnBlock, TemporalAttnBlock, TimeResBlock
from occ_mfd.models.embeddings import fourier_features, timestep_embedding
from occ_mfd.models.vae_blocks import group_norm


@dataclass
class ForecastCond:
    """Condition of the forecaster.

    past_latents: (B, P, C, H, W) scaled VAE latents of the history (oldest first, current frame last).
    ego: (B, P+F, 4, 4) pose of each frame's ego in the current frame (``ego[:, P-1]`` = identity).
    prior_latents: (B, F, C, H, W) scaled latents of the ego-motion prior (the current frame warped to each
        future frame, :func:`occ_mfd.ego_motion.prior_frames`), or None; required by a net with ``prior``.
    lidar_traj: (B, P+F, 2) per frame, the (dx, dy) in metres of the LiDAR origin from that keyframe to the next, in
        that keyframe's LiDAR frame (upstream OccFM / VAD convention), zero where there is no next keyframe; or None.
        Only the released OccFM's flow net reads it (:mod:`occ_mfd.models.occfm_official.adapter`).
    decode_prior: (B, F, X, Y, Z) voxels of the ego-motion prior that a refining decoder reads
        (:class:`~occ_mfd.models.prior_refiner.PriorRefiner`), or None; no network reads it.
    """

    past_latents: torch.Tensor
    ego: torch.Tensor
    prior_latents: torch.Tensor | None = None
    lidar_traj: torch.Tensor | None = None
    decode_prior: torch.Tensor | None = None


def ego_trajectory(ego: torch.Tensor, xy_scale: float = 0.02) -> torch.Tensor:
    """(B, T, 4, 4) poses → (B, T, 3) [x·s, y·s, yaw/π] in the current frame (s ≈ 1/50 m: O(1) values)."""
    xy = ego[..., :2, 3] * xy_scale
    yaw = torch.atan2(ego[..., 1, 0], ego[..., 0, 0]) / torch.pi
    return torch.cat([xy, yaw[..., None]], dim=-1)


PREDICTIONS = ("velocity", "data")
#: Smallest 1 − t by which a data prediction is divided (x̂1 → v): bounds the velocity near t = 1.
DATA_PRED_MIN_GAP = 0.05


class OccForecaster(nn.Module):
    """``forward(x_t (B, F, C, H, W), t (B,), cond: ForecastCond, drop_cond (B,) bool | None) -> v (B, F, C, H, W)``."""

    def __init__(
        self,
        latent_channels: int = 16,
        past: int = 4,
        future: int = 6,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 4),
        num_res_blocks: int = 2,
        attn_levels: tuple[int, ...] = (1, 2),
        heads: int = 8,
        traj_mode: str = "past",
        traj_freqs: int = 4,
        attn_backend: str = "auto",
        mid_attn: bool = True,
        prior: str | None = None,
        patch: int = 1,
        residual: bool = False,
        prediction: str = "velocity",
    ):
        # The constructor arguments, so an inference snapshot can rebuild this network (models/snapshot.py).
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs
        if traj_mode not in ("past", "future"):
            raise ValueError(f"traj_mode must be 'past' or 'future', got {traj_mode!r}")
        if prior not in (None, *PRIORS):
            raise ValueError(f"prior must be None or one of {PRIORS}, got {prior!r}")
        if prior == "warp" and traj_mode == "past":
            # "warp" reads the true future poses: a past-conditioned model must not see them.
            raise ValueError("prior='warp' uses the future ego poses: it needs traj_mode='future' "
                             "(use prior='cv-warp' with traj_mode='past')")
        self.prior = prior
        if residual and prior is None:
            raise ValueError("residual=True generates the difference to the ego-motion prior: it needs a prior")
        # residual: the flow's data is (future latents − prior latents); LatentPrepare subtracts the prior and the
        # pipeline adds it back after sampling. The network and the distillers see one velocity field as before.
        self.residual = bool(residual)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch = patch
        self.latent_channels, self.past, self.future, self.traj_mode = latent_channels, past, future, traj_mode
        self.base_channels, self.traj_freqs = base_channels, traj_freqs
        emb = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        n_traj = past + (future if traj_mode == "future" else 0)
        self.traj_mlp = nn.Sequential(nn.Linear(n_traj * 3 * (2 * traj_freqs + 1), emb), nn.SiLU(), nn.Linear(emb, emb))
        # With a prior, every frame carries two latents: future frames [x_t ‖ prior], past frames [latent ‖ 0].
        # patch > 1: space-to-depth (p×p latent cells → channels) before the stem, depth-to-space after the output
        # (DiT's patchify), so a finer latent grid — a VAE that keeps small classes — costs the U-Net nothing.
        in_ch = latent_channels * patch * patch * (2 if prior else 1)
        self.stem = nn.Conv3d(in_ch, base_channels, 3, padding=1)  # over (T, H, W)
        chs = [base_channels * m for m in channel_mult]

        def level(in_ch: int, out_ch: int, attn: bool) -> nn.ModuleList:
            mods = [TimeResBlock(in_ch if i == 0 else out_ch, out_ch, emb) for i in range(num_res_blocks)]
            if attn:
                mods += [SpatialAttnBlock(out_ch, emb, heads, attn_backend), TemporalAttnBlock(out_ch, emb, heads, attn_backend)]
            return nn.ModuleList(mods)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = base_channels
        for i, ch in enumerate(chs):
            self.down.append(level(prev, ch, i in attn_levels))
            if i < len(chs) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        mid = [TimeResBlock(prev, prev, emb)]
        if mid_attn:
            mid += [SpatialAttnBlock(prev, emb, heads, attn_backend), TemporalAttnBlock(prev, emb, heads, attn_backend)]
        mid.append(TimeResBlock(prev, prev, emb))
        self.mid = nn.ModuleList(mid)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chs))):
            # Input: upsampled deeper features (prev) ‖ skip of this level (chs[i]).
            self.up.append(level(prev + chs[i], chs[i], i in attn_levels))
            if i > 0:
                self.upsample.append(nn.Conv2d(chs[i], chs[i - 1], 3, padding=1))
            prev = chs[i - 1] if i > 0 else chs[0]
        self.out_norm = group_norm(chs[0])
        self.out = nn.Conv2d(chs[0], latent_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # --- conditioning -------------------------------------------------------------------------------
    def embed(self, t: torch.Tensor, ego: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """(B,) t, (B, P+F, 4, 4) ego, (B,) keep mask → (B, D) conditioning vector."""
        e = self.time_mlp(timestep_embedding(t, self.base_channels))
        n = self.past + (self.future if self.traj_mode == "future" else 0)
        traj = fourier_features(ego_trajectory(ego[:, :n]), self.traj_freqs).flatten(1)  # (B, n·3·(2K+1))
        return e + self.traj_mlp(traj) * keep[:, None]

    @staticmethod
    def _run(mods, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for m in mods:
            h = m(h, emb)
        return h

    @staticmethod
    def _spatial(conv: nn.Module, h: torch.Tensor, size=None) -> torch.Tensor:
        """Apply a 2-D op per frame (optionally nearest-resize to ``size`` first). (B, T, C, H, W)."""
        B, T = h.shape[:2]
        x = h.flatten(0, 1)
        if size is not None:
            x = F.interpolate(x, size=size, mode="nearest")
        return conv(x).unflatten(0, (B, T))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: ForecastCond,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        B, Fn, C, H, W = x_t.shape
        P = self.past
        if Fn != self.future or C != self.latent_channels:
            raise ValueError(f"OccForecaster: x_t {tuple(x_t.shape)} != (B, {self.future}, {self.latent_channels}, H, W)")
        if H % self.patch or W % self.patch:
            raise ValueError(f"OccForecaster: latent H, W = {H}, {W} not divisible by patch={self.patch}")
        if cond.past_latents.shape != (B, P, C, H, W) or cond.ego.shape != (B, P + Fn, 4, 4):
            raise ValueError(f"OccForecaster: cond shapes past_latents {tuple(cond.past_latents.shape)}, "
                             f"ego {tuple(cond.ego.shape)} do not match x_t {tuple(x_t.shape)} with P={P}")
        keep = torch.ones(B, device=x_t.device, dtype=x_t.dtype)
        if drop_cond is not None:
            keep = (~drop_cond.to(device=x_t.device, dtype=torch.bool)).to(x_t.dtype)
        emb = self.embed(t.to(x_t.dtype).expand(B), cond.ego.to(x_t.dtype), keep)     # (B, D)
        past = cond.past_latents.to(x_t.dtype) * keep[:, None, None, None, None]        # zeroed history
        x = torch.cat([past, x_t], dim=1)                                             # (B, T, C, H, W)
        if self.prior is not None:
            if cond.prior_latents is None or cond.prior_latents.shape != x_t.shape:
                got = None if cond.prior_latents is None else tuple(cond.prior_latents.shape)
                raise ValueError(f"OccForecaster(prior={self.prior!r}) needs cond.prior_latents of shape "
                                 f"{tuple(x_t.shape)}, got {got}")
            # The prior is condition: CFG's unconditional branch drops it with the history.
            prior = cond.prior_latents.to(x_t.dtype) * keep[:, None, None, None, None]
            x = torch.cat([x, torch.cat([torch.zeros_like(past), prior], dim=1)], dim=2)  # (B, T, 2C, H, W)
        if self.patch > 1:
            x = F.pixel_unshuffle(x.flatten(0, 1), self.patch).unflatten(0, (B, P + Fn))  # (B, T, C·p², H/p, W/p)
        h = self.stem(x.transpose(1, 2)).transpose(1, 2)                              # (B, T, c0, H, W)
        skips = []
        for i, mods in enumerate(self.down):
            h = self._run(mods, h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self._spatial(self.downsample[i], h)
        h = self._run(self.mid, h, emb)
        for j, mods in enumerate(self.up):
            skip = skips.pop()
            h = torch.cat([h, skip], dim=2)
            h = self._run(mods, h, emb)
            if j < len(self.upsample):
                h = self._spatial(self.upsample[j], h, size=skips[-1].shape[-2:])
        B_, T = h.shape[:2]
        out = self.out(F.silu(self.out_norm(h.flatten(0, 1))))                       # (B·T, C·p², H/p, W/p)
        if self.patch > 1:
            out = F.pixel_shuffle(out, self.patch)                                     # (B·T, C, H, W)
        out = out.unflatten(0, (B_, T))[:, P:]                                        # (B, F, C, H, W)
        if self.prediction == "data":                   # out = x̂1: the velocity that reaches it from x_t
            gap = (1 - t.to(x_t.dtype).expand(B)).clamp_min(DATA_PRED_MIN_GAP)[:, None, None, None, None]
            out = (out - x_t) / gap
        return out
