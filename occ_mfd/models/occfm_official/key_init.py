"""Weights derived from a ``state_dict`` key's name and shape alone (PORT.md §7).

Any implementation with the same keys gets the same values, so golden outputs computed by the upstream code
can be re-checked by ours without shipping weights: seed = crc32(key); matrices and kernels draw
``randn · fan_in^-½``; norm scales ``1 + 0.1·randn``; other vectors ``0.1·randn`` (non-zero, so that adaLN
modulations and biases are exercised: with zero adaLN every DiT block would be the identity).
Fixed tables that the architecture computes (listed in :data:`FIXED_KEYS`) and buffers keep their values.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

#: Key suffixes of parameters the architecture fills itself (frozen sin-cos / height tables).
FIXED_KEYS = ("height_embedding", "pos_embed", "temp_embed")


def _is_fixed(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return last in FIXED_KEYS  # "absolute_pos_embed" (learned) does not match: its last part differs


def _is_norm_scale(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] == "gamma" or (parts[-1] == "weight" and any("norm" in p for p in parts[:-1]))


def key_derived_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of ``shape`` determined by ``key`` (see module docstring)."""
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    if _is_norm_scale(key):
        x = 1.0 + 0.1 * x
    elif len(shape) >= 2:
        fan_in = max(1, int(torch.Size(shape).numel() // shape[0]))
        x = x * fan_in ** -0.5
    else:
        x = 0.1 * x
    return x.float()


@torch.no_grad()
def fill_from_keys(module: nn.Module) -> nn.Module:
    """Overwrite every parameter of ``module`` (except :data:`FIXED_KEYS`) with :func:`key_derived_tensor`."""
    for key, p in module.named_parameters():
        if not _is_fixed(key):
            p.copy_(key_derived_tensor(key, tuple(p.shape)))
    return module
