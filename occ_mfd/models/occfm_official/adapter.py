"""The released OccFM flow net behind this project's forecaster contract (:class:`~occ_mfd.models.forecaster.OccForecaster`).

``OccFmForecaster(x_t (B, F, C, h, w), t (B,), cond: ForecastCond, drop_cond (B,) bool | None) -> v (B, F, C, h, w)``,
so the teacher flow-matching objective, MFD and the other distillers, the pipeline, eval, bench and the viewer run it
unchanged. Per call it builds upstream's input (PORT.md §3):

- frames ``[0, 0, past latents (P = 4), x_t (F = 6)]`` → (B, 12, C, h, w); latents are already ×10 (our codec's
  scale is upstream's RESCALE_FACTOR) and the two oldest frames are zero, as upstream's data always makes them;
- t ∈ [0, 1] (t = 0 noise: the same convention as upstream) → t·1000, what upstream's net receives;
- trajectory ``[0, 0, cond.lidar_traj rows]``: the per-frame LiDAR displacement to the next keyframe (metres, in
  that keyframe's LiDAR frame). The hist net reads rows [:P], whose last row is the current frame's displacement to
  the first future frame (upstream's 0.5 s look-ahead); the fut net reads rows [:P+F] (the planned path up to the
  frame after the window);
- ``drop_cond``: zeroes the past latents only; the trajectory stays (upstream's CFG, unlike OccForecaster's, which
  also drops its trajectory term).

The net predicts all 12 frames; the last F are returned.
"""
from __future__ import annotations

import torch
from torch import nn

from occ_mfd.models.forecaster import ForecastCond
from occ_mfd.models.occfm_official.unet import OccFmFlowNet
from occ_mfd.models.occfm_official.upstream_config import flow_section

#: Upstream's window (unet.FRAMES = 12): 2 always-zero frames, then P = 4 past and F = 6 future frames.
LEAD_FRAMES, PAST, FUTURE = 2, 4, 6
#: Upstream feeds t·1000 to its net (``time_scalar``).
TIME_SCALE = 1000.0


class OccFmForecaster(nn.Module):
    """``forward(x_t (B, 6, C, h, w), t (B,) ∈ [0, 1], cond, drop_cond (B,) bool | None) -> v (B, 6, C, h, w)``.

    Args:
        net: the flow net's constructor kwargs (upstream's YAML keys lower-cased, as
            :func:`~occ_mfd.models.occfm_official.upstream_config.flow_section` returns them), or the net itself.
        past, future: must be 4 and 6, the window the released weights were trained on.

    Attributes read by the rest of the project (values of an OccForecaster without prior, velocity output):
    ``past``, ``future``, ``latent_channels``, ``prior`` (None), ``residual`` (False), ``prediction`` ("velocity"),
    ``traj_mode`` ("future": both variants read at least one displacement beyond the current frame), ``init_kwargs``
    (rebuilds this module through ``occ_mfd.builder``, see ``models/snapshot.py``). ``net`` is the
    :class:`OccFmFlowNet` (state_dict keys ``net.<upstream key>``; its time MLP is ``net.t_embedder``).
    """

    def __init__(self, net: dict | OccFmFlowNet, past: int = PAST, future: int = FUTURE):
        super().__init__()
        if (past, future) != (PAST, FUTURE):
            raise ValueError(f"OccFmForecaster: the released net's 12-frame window is 2 zero + {PAST} past + {FUTURE} "
                             f"future frames; got past={past}, future={future}")
        self.net = net if isinstance(net, OccFmFlowNet) else OccFmFlowNet(**net)
        if self.net.in_channels != self.net.out_channels:
            raise ValueError(f"OccFmForecaster: the net maps {self.net.in_channels} to {self.net.out_channels} "
                             "channels; a velocity needs the latent's own width")
        # Trajectory rows taken from cond.lidar_traj: the net's rows minus the two leading zero rows.
        self.traj_rows = self.net.trajectory_length - LEAD_FRAMES
        if not 0 < self.traj_rows <= past + future:
            raise ValueError(f"OccFmForecaster: trajectory_length {self.net.trajectory_length} must be in "
                             f"[{LEAD_FRAMES + 1}, {LEAD_FRAMES + past + future}] (2 zero rows + rows of the window)")
        self.init_kwargs = {"net": dict(self.net.init_kwargs), "past": int(past), "future": int(future)}
        self.past, self.future, self.latent_channels = int(past), int(future), self.net.in_channels
        self.prior, self.residual, self.prediction, self.traj_mode = None, False, "velocity", "future"

    @classmethod
    def from_upstream_config(cls, cfg: dict) -> "OccFmForecaster":
        """From an upstream world-model config as read by ``upstream_config.load_upstream_yaml``."""
        return cls(flow_section(cfg))

    def trajectory(self, cond: ForecastCond, batch: int, device: torch.device) -> torch.Tensor:
        """(B, trajectory_length, 2) float32 rows the net reads: 2 zero rows + ``cond.lidar_traj[:, :traj_rows]``."""
        traj = cond.lidar_traj
        n = self.past + self.future
        if traj is None:
            raise ValueError("OccFmForecaster needs cond.lidar_traj (B, P+F, 2): each frame's LiDAR displacement to "
                             "the next keyframe (the released OccFM's trajectory); this batch's condition has none")
        if traj.shape != (batch, n, 2):
            raise ValueError(f"OccFmForecaster: cond.lidar_traj {tuple(traj.shape)} != (B, P+F, 2) = ({batch}, {n}, 2)")
        rows = traj[:, :self.traj_rows].to(device=device, dtype=torch.float32)
        return torch.cat([rows.new_zeros(batch, LEAD_FRAMES, 2), rows], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: ForecastCond,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        B, Fn, C, H, W = x_t.shape
        if Fn != self.future or C != self.latent_channels:
            raise ValueError(f"OccFmForecaster: x_t {tuple(x_t.shape)} != (B, {self.future}, {self.latent_channels}, "
                             "h, w)")
        if cond.past_latents.shape != (B, self.past, C, H, W):
            raise ValueError(f"OccFmForecaster: cond.past_latents {tuple(cond.past_latents.shape)} != "
                             f"(B, {self.past}, C, h, w) of x_t {tuple(x_t.shape)}")
        traj = self.trajectory(cond, B, x_t.device)                                   # (B, 6 | 12, 2)
        past = cond.past_latents.to(x_t.dtype)
        if drop_cond is not None:           # CFG's unconditional branch: zero history latents, trajectory kept
            keep = ~drop_cond.to(device=x_t.device, dtype=torch.bool)
            past = past * keep.to(x_t.dtype)[:, None, None, None, None]
        x = torch.cat([x_t.new_zeros(B, LEAD_FRAMES, C, H, W), past, x_t], dim=1)     # (B, 12, C, h, w)
        time = torch.as_tensor(t, device=x_t.device).float().expand(B) * TIME_SCALE
        return self.net(x, time, traj)[:, -Fn:]                                       # (B, F, C, h, w)
