"""Checking imported modules against reference outputs of the upstream code (``tools/occfm_reference.py``).

A reference ``.npz`` holds, in the upstream modules' own layout and units, any of:
``occ`` (B, X, Y, Z) uint8 with ``mu``, ``logvar`` (B, C, h, w) (the encoder's posterior) and ``logits``
(B, 18, X, Y, Z) (the decoder's class logits for ``mu``); ``x`` (B, 12, C, h, w), ``t`` (B,) (as passed to the flow
net, already ×1000), ``traj`` (B, n, 2) and ``v`` (B, 12, C, h, w). :func:`verify_reference` runs our modules on the
same inputs and returns the largest absolute error per output. The same function checks the committed goldens
(reduced width, key-derived weights) in the tests and a user's real weights in ``tools/import_occfm.py --verify``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

VAE_KEYS = ("occ", "mu", "logvar", "logits")
FLOW_KEYS = ("x", "t", "traj", "v")
#: fp32 on CPU: the import is exact when every error is below this (``--verify`` exits 1 above it).
TOLERANCE = 1e-4


def load_reference(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a reference file; a clear error when it holds neither a complete VAE nor a flow set."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            ref = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such reference file") from None
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz reference ({e})") from None
    has_vae, has_flow = all(k in ref for k in VAE_KEYS), all(k in ref for k in FLOW_KEYS)
    if not has_vae and not has_flow:
        raise ValueError(f"{path}: holds neither the VAE keys {VAE_KEYS} nor the flow keys {FLOW_KEYS} "
                         f"(found {sorted(ref)})")
    return ref


def _max_err(ours: torch.Tensor, ref: np.ndarray, name: str) -> float:
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"reference {name!r} has shape {tuple(ref.shape)}, our module gives {tuple(ours.shape)}")
    return float((ours.double() - torch.from_numpy(np.asarray(ref)).double()).abs().max())


@torch.no_grad()
def verify_reference(ref: dict[str, np.ndarray], vae: nn.Module | None = None,
                     flow_net: nn.Module | None = None) -> dict[str, float]:
    """{output name: max |ours − reference|} for the parts ``ref`` holds and a module is given for.

    ``vae``: an :class:`~occ_mfd.models.occfm_official.vae.OccFmVAE`; ``flow_net``: the raw
    :class:`~occ_mfd.models.occfm_official.unet.OccFmFlowNet` (upstream layout, not the adapter)."""
    errs: dict[str, float] = {}
    if vae is not None and all(k in ref for k in VAE_KEYS):
        dist = vae.encode(torch.from_numpy(ref["occ"]).long())
        errs["mu"] = _max_err(dist.mean, ref["mu"], "mu")
        errs["logvar"] = _max_err(dist.logvar, ref["logvar"], "logvar")
        logits = vae.decode(torch.from_numpy(ref["mu"]).float())
        errs["logits"] = _max_err(logits, ref["logits"], "logits")
    if flow_net is not None and all(k in ref for k in FLOW_KEYS):
        v = flow_net(torch.from_numpy(ref["x"]).float(), torch.from_numpy(ref["t"]).float(),
                     torch.from_numpy(ref["traj"]).float())
        errs["v"] = _max_err(v, ref["v"], "v")
    return errs
