"""Streaming forecasts along a drive: keep the history latents between consecutive calls, encode one new frame.

A drive's consecutive windows (``OccSequenceDataset`` with stride 1) share P − 1 of their P history frames: window
i+1's history is window i's shifted by one keyframe. :class:`OccForecastPipeline` re-encodes all P frames on
every call; :class:`StreamingForecaster` keeps the P latents of the last call and, when the next batch continues
it, encodes only the newest frame. The forecast is the pipeline's, up to float rounding (encoding one frame alone
rounds differently from encoding it in a batch of P, ~1e-6).

Why only latents are cached, and why they can be: a past frame's latent is ``vae.encode`` of that frame's labels
*in its own ego frame* (the dataset loads each frame's labels as stored, it does not warp the history into the
current frame), one frame at a time (``LatentCodec.encode`` flattens (B, T) into the VAE's batch; the VAE has no
batch-coupled layers), so it does not change when the current frame moves on. What does change per call is the
poses (``batch.ego``: every frame's pose re-expressed in the *current* frame, recomputed by the dataset for each
window) and the ego-motion prior (the *current* frame warped to each future frame): both are taken from each call's
batch, never cached.
"""
from __future__ import annotations

import torch

from occ_mfd.models.forecaster import ForecastCond
from occ_mfd.models.pipeline import Forecast, OccForecastPipeline


class StreamingForecaster:
    """``forecast(batch)`` = ``pipeline.forecast(batch)``, re-using the history latents of the previous call.

    A call *continues* the previous one when its batch names the same scene (``batch.scenes``) and its P history
    sample tokens (``batch.tokens[0][:P]``) are the previous history shifted by exactly one keyframe: then the P − 1
    cached latents are kept and only ``batch.past[:, -1]`` is encoded. Anything else — another scene, a skipped
    keyframe (a window stride > 1 included), the same window again, a batch without scene / tokens, another P or
    device — encodes the whole history and restarts the cache from this call.

    Batch size 1 only (one drive per forecaster; ``ValueError`` for B > 1). Not thread-safe; no global state: the
    cache lives in the instance. The ego-motion prior of a net that has one (``net.prior``, e.g. ``"cv-warp"``) is
    the current frame warped by the call's own poses, so its F frames are warped and encoded on every call, as in
    the pipeline. Counters: ``calls``, ``hits`` (calls that continued the previous one), ``frames_encoded`` (history
    frames sent to the VAE; the prior's frames are not counted); they run on across :meth:`reset`.
    """

    def __init__(self, pipeline: OccForecastPipeline):
        if getattr(pipeline.codec, "sample", False):
            # a sampled posterior draws fresh noise for every frame on every call; a cache would freeze it
            raise ValueError("StreamingForecaster: the pipeline's codec encodes posterior samples (sample=True); "
                             "streaming reuses latents and needs deterministic posterior-mean encoding")
        self.pipeline = pipeline
        self.calls = self.hits = self.frames_encoded = 0
        self.reset()

    def reset(self) -> None:
        """Forget the cached history: the next call encodes all P frames."""
        self._key: tuple[str, tuple[str, ...]] | None = None   # (scene, P history tokens) of the cached latents
        self._latents: torch.Tensor | None = None              # (1, P, C, H, W) scaled history latents

    @staticmethod
    def _history_key(batch) -> tuple[str, tuple[str, ...]] | None:
        """(scene, P history tokens) of a batch of 1, or None when the batch does not name its frames."""
        scenes, tokens = getattr(batch, "scenes", None), getattr(batch, "tokens", None)
        P = batch.past.shape[1]
        if not scenes or not tokens or len(tokens[0]) < P or not scenes[0]:
            return None
        return scenes[0], tuple(tokens[0][:P])

    def _continues(self, key: tuple[str, tuple[str, ...]] | None, past: torch.Tensor) -> bool:
        """Whether ``key`` is the cached history shifted by one keyframe, with latents usable for ``past``."""
        if key is None or self._key is None or self._latents is None:
            return False
        (scene, tokens), (old_scene, old_tokens) = key, self._key
        return (scene == old_scene and len(tokens) == len(old_tokens) and tokens[:-1] == old_tokens[1:]
                and self._latents.device == past.device)

    def past_latents(self, batch) -> torch.Tensor:
        """OccBatch (B = 1) → (1, P, C, H, W) scaled history latents (what ``codec.condition`` gives as
        ``past_latents``), encoding 1 frame when the batch continues the previous call and P frames otherwise."""
        past = batch.past                                                          # (1, P, X, Y, Z)
        if past.shape[0] != 1:
            raise ValueError(f"StreamingForecaster: batch size 1 only (one drive per forecaster), got a batch of "
                             f"{past.shape[0]}; use one StreamingForecaster per drive or OccForecastPipeline")
        key = self._history_key(batch)
        self.calls += 1
        if self._continues(key, past):
            new = self.pipeline.codec.encode(past[:, -1:])                         # (1, 1, C, H, W)
            latents = torch.cat([self._latents[:, 1:], new.to(self._latents.dtype)], dim=1)
            self.hits += 1
            self.frames_encoded += 1
        else:
            latents = self.pipeline.codec.encode(past)                             # (1, P, C, H, W)
            self.frames_encoded += past.shape[1]
        if key is None:     # unnamed frames: nothing to recognise the next call by
            self.reset()
        else:
            self._key, self._latents = key, latents
        return latents

    def condition(self, batch, past_latents: torch.Tensor) -> ForecastCond:
        """The forecaster's condition from ``past_latents`` (1, P, C, H, W) and this batch's poses, prior and LiDAR
        trajectory: ``codec.condition`` with the history latents given (the prior is warped and encoded here)."""
        return self.pipeline.codec.condition(batch, getattr(self.pipeline.net, "prior", None), decode_prior=True,
                                             past_latents=past_latents)

    def encode(self, batch) -> ForecastCond:
        """The streaming twin of :meth:`OccForecastPipeline.encode`."""
        return self.condition(batch, self.past_latents(batch))

    def forecast(self, batch, steps: int | None = None, generator: torch.Generator | None = None,
                 cfg_scale: float | None = None) -> Forecast:
        """encode (cached history + 1 new frame) → the pipeline's noise → sample → decode → argmax:
        classes (1, F, X, Y, Z), latents (1, F, C, H, W)."""
        with torch.no_grad():
            return self.pipeline.forecast_from(self.encode(batch), steps, generator, cfg_scale)
