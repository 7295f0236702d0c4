"""On-disk cache of per-frame VAE latents, for fast teacher training (issue 4).

Layout: ``<root>/meta.json`` (``{"key": ...}``, e.g. the VAE checkpoint and its step) and
``<root>/<scene>/<token>.npy`` with one (C, H, W) float32 latent per keyframe. Writes are atomic. An
instance is the ``latent_cache=`` hook of :class:`occ_mfd.data.sequences.OccSequenceDataset`; a cache built
with another ``key`` (another VAE) is refused with a clear error instead of being silently reused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from occ_mfd.atomic import atomic_write


class LatentCache:
    def __init__(self, root: str | os.PathLike, key: str | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "meta.json"
        if meta.is_file():
            stored = json.loads(meta.read_text()).get("key")
            if key is not None and stored != key:
                raise ValueError(f"latent cache {self.root}: built for key {stored!r}, asked for {key!r}; "
                                 f"use another folder or delete it")
            self.key = stored
        else:
            self.key = key
            _atomic_write_bytes(meta, json.dumps({"key": key}).encode())

    def path(self, scene: str, token: str) -> Path:
        if not scene or not token or "/" in scene + token or scene.startswith("."):
            raise ValueError(f"latent cache: bad scene/token {scene!r}/{token!r}")
        return self.root / scene / f"{token}.npy"

    def get(self, scene: str, token: str) -> np.ndarray | None:
        """(C, H, W) float32 latent, or None if not cached."""
        p = self.path(scene, token)
        return np.load(p) if p.is_file() else None

    def put(self, scene: str, token: str, latent: np.ndarray | torch.Tensor) -> None:
        if isinstance(latent, torch.Tensor):
            latent = latent.detach().float().cpu().numpy()
        latent = np.asarray(latent, dtype=np.float32)
        if latent.ndim != 3:
            raise ValueError(f"latent cache: expected a (C, H, W) latent for {scene}/{token}, got {latent.shape}")
        atomic_write(self.path(scene, token), lambda f: np.save(f, latent))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


@torch.no_grad()
def fill_latent_cache(encode: Callable[[torch.Tensor], torch.Tensor], dataset, cache: LatentCache,
                      batch_size: int = 8, device: str | torch.device = "cpu") -> int:
    """Encode every frame of ``dataset`` (items with ``past``, ``future``, ``scene``, ``tokens``, like
    :class:`OccSequence`) that is not cached yet. ``encode``: (N, X, Y, Z) int64 semantics on ``device`` →
    (N, C, H, W) latents (e.g. ``lambda occ: vae.encode(occ).mean``). Returns the number of frames encoded."""
    pending: list[tuple[str, str, np.ndarray]] = []
    queued: set[tuple[str, str]] = set()
    done = 0

    def flush():
        nonlocal done
        occ = torch.from_numpy(np.stack([f for _, _, f in pending])).long().to(device)  # (N, X, Y, Z)
        lat = encode(occ)                                                                 # (N, C, H, W)
        for (scene, token, _), z in zip(pending, lat):
            cache.put(scene, token, z)
        done += len(pending)
        pending.clear()

    for i in tqdm(range(len(dataset)), desc="caching latents", unit="window"):
        item = dataset[i]
        frames = np.concatenate([item.past, item.future])  # (P+F, X, Y, Z)
        for token, frame in zip(item.tokens, frames):
            k = (item.scene, token)
            if k in queued or cache.path(*k).is_file():
                continue
            queued.add(k)
            pending.append((item.scene, token, frame))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()
    return done
