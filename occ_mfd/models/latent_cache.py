"""A bounded least-recently-used store of per-frame latents of a *frozen* codec.

Why: a tiny forecaster's training step is dominated by encoding — every step encodes the P + F frames of each
window (and F ego-motion prior frames), although the VAE is frozen and, with stride-1 windows, every frame recurs
in up to P + F windows per epoch. On the demo (8 × 50 × 50 latents, 2 CPU threads) the first 100 teacher steps
took 89 s without the cache and 59 s with it (README, "Speed"). The latents are a pure function of the frame (posterior mean), so they
are cached under a key that names the frame: ``(scene, token)`` for a recorded frame, ``(scene, token, prior,
P, k)`` for the k-th ego-motion prior frame of the window whose current frame is ``token``.
Only valid while the codec is frozen and encodes the mean (``LatentCodec(sample=False)``); one per process.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import torch


class LatentCache:
    """``fetch(keys, encode) -> (N, C, H, W)``; up to ``max_mb`` MB of latents, least recently used evicted."""

    def __init__(self, max_mb: float):
        if max_mb <= 0:
            raise ValueError(f"LatentCache: max_mb must be > 0, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self._store: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def fetch(self, keys: Sequence[Hashable], encode: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Latents of ``keys`` (N,) → (N, C, H, W). ``encode(indices)`` returns the latents of ``keys[i]`` for the
        indices of the first occurrence of each key not in the cache, (len(indices), C, H, W), in that order; it
        is not called when all are cached."""
        first: dict[Hashable, int] = {}          # each missing key once (a frame shared by two windows of a batch)
        held: dict[Hashable, torch.Tensor] = {}  # taken before storing new ones, which may evict them
        for i, k in enumerate(keys):
            if k in self._store:
                self._store.move_to_end(k)
                held[k] = self._store[k]
            elif k not in first:
                first[k] = i
        fresh: dict[Hashable, torch.Tensor] = {}
        if first:
            new = encode(list(first.values())).detach()
            if new.shape[0] != len(first):
                raise ValueError(f"LatentCache: encode returned {new.shape[0]} latents for {len(first)} keys")
            fresh = dict(zip(first, new))
            for k, latent in fresh.items():
                self._put(k, latent)
        out = [fresh[k] if k in fresh else held[k] for k in keys]
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        return torch.stack(out)

    def _put(self, key: Hashable, latent: torch.Tensor) -> None:
        if key in self._store:
            return
        latent = latent.clone()          # not a view: a stored slice would keep its whole batch alive
        size = latent.numel() * latent.element_size()
        if size > self.max_bytes:
            return
        self._store[key] = latent
        self._bytes += size
        while self._bytes > self.max_bytes:
            old = self._store.popitem(last=False)[1]
            self._bytes -= old.numel() * old.element_size()
