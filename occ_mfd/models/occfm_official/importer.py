"""Importing a released OccFM checkpoint (VAE or world model) into occ-mfd snapshots.

Upstream files (PORT.md §2) are plain ``torch.save`` dicts: ``state_dict`` (DDP keys, ``module.`` prefix) and
``ema_model`` (an ``AveragedModel`` state: ``n_averaged`` plus ``module.``-prefixed keys, or None), with optimiser,
epoch, scaler and scheduler entries beside them. A world-model file holds the VAE (``embedding. / encoder. /
decoder.``) and the flow net (``transition_model.``); hist and fut differ only in the flow net's trajectory
encoder. No config is stored: the architecture comes from the run's upstream YAML.

Everything is checked before anything is written, so a bad file leaves the output folder as it was:
every key and shape against the modules built from the YAML (the first mismatch is named), hist vs fut.

The EMA copy is the default (the official evaluation uses it), but :class:`torch.optim.swa_utils.AveragedModel`
also averages integer buffers, truncating: the EMA's Swin ``relative_position_index`` tables drift from the
clean ones. We load buffers exactly as stored (never recompute them) and report how many integer entries differ
between the two copies, so a user can see which function the official numbers computed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from occ_mfd.atomic import atomic_write
from occ_mfd.grid import GridSpec
from occ_mfd.models.occfm_official.adapter import OccFmForecaster
from occ_mfd.models.occfm_official.upstream_config import (
    UpstreamConfigError,
    flow_section,
    load_upstream_yaml,
    loss_section,
)
from occ_mfd.models.occfm_official.vae import OccFmVAE
from occ_mfd.models.pipeline import SamplerSettings
from occ_mfd.models.snapshot import Snapshot, save_snapshot

VAE_PREFIXES = ("embedding.", "encoder.", "decoder.")
FLOW_PREFIX = "transition_model."
#: Trajectory rows per variant (upstream ``TRAJECTORY_LENGTH``).
VARIANTS = {6: "hist", 12: "fut"}


class CheckpointMismatch(ValueError):
    """An upstream checkpoint that does not fit the modules its config describes (names file and key)."""


@dataclass
class UpstreamWeights:
    """One copy of an upstream checkpoint's weights, prefixes stripped.

    vae, flow: state dicts (flow empty for a VAE-only file); used: "ema" or "raw"; note: why another copy than
    asked was used (or ""); int_buffer_diffs: {key: number of entries where the EMA and raw integer buffers
    differ} (empty when the file has one copy); epoch: upstream epoch (or None)."""

    vae: dict[str, torch.Tensor]
    flow: dict[str, torch.Tensor]
    used: str
    note: str = ""
    int_buffer_diffs: dict[str, int] = field(default_factory=dict)
    epoch: int | None = None


def _strip(sd: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in sd.items() if k != "n_averaged"}


def read_upstream_checkpoint(path: str | Path, weights: str = "ema") -> UpstreamWeights:
    """Read an upstream ``.ckpt`` with ``weights_only=True`` and pick the ``ema_model`` (``weights="ema"``) or
    ``state_dict`` (``"raw"``) copy; a file without an EMA copy falls back to the raw one and says so."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for foreign or truncated files (KeyError, EOFError, ...)
        raise CheckpointMismatch(f"{path}: cannot be read as a torch checkpoint (truncated or not a checkpoint?): "
                                 f"{e}") from None
    if not isinstance(ckpt, dict) or not any(isinstance(ckpt.get(k), dict) for k in ("state_dict", "ema_model")):
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointMismatch(f"{path}: not an OccFM checkpoint (expected a dict with 'state_dict' and/or "
                                 f"'ema_model'; found {found})")
    raw = _strip(ckpt["state_dict"]) if isinstance(ckpt.get("state_dict"), dict) else None
    ema = _strip(ckpt["ema_model"]) if isinstance(ckpt.get("ema_model"), dict) else None
    chosen, used, note = (ema, "ema", "") if weights == "ema" else (raw, "raw", "")
    if chosen is None:
        chosen, used = (raw, "raw") if weights == "ema" else (ema, "ema")
        note = f"the file has no {'ema_model' if weights == 'ema' else 'state_dict'} copy; used its {used} copy"
    diffs = {}
    if raw is not None and ema is not None:
        for k, v in raw.items():
            e = ema.get(k)
            if e is not None and not v.is_floating_point() and e.shape == v.shape:
                n = int((e != v).sum())
                if n:
                    diffs[k] = n
    vae = {k: v for k, v in chosen.items() if k.startswith(VAE_PREFIXES)}
    flow = {k.removeprefix(FLOW_PREFIX): v for k, v in chosen.items() if k.startswith(FLOW_PREFIX)}
    other = [k for k in chosen if not k.startswith(VAE_PREFIXES) and not k.startswith(FLOW_PREFIX)]
    if other:
        raise CheckpointMismatch(f"{path}: key {other[0]!r} is neither the VAE's (embedding./encoder./decoder.) nor "
                                 f"the flow net's (transition_model.): not an OccFM checkpoint")
    if not vae and not flow:
        raise CheckpointMismatch(f"{path}: the {used} copy holds no weights")
    epoch = ckpt.get("epoch")
    return UpstreamWeights(vae, flow, used, note, diffs, int(epoch) if isinstance(epoch, int) else None)


def variant_of(flow_kwargs: dict) -> str:
    n = int(flow_kwargs.get("trajectory_length", 6))
    if n not in VARIANTS:
        raise UpstreamConfigError(f"TRAJECTORY_LENGTH {n}: expected 6 (hist) or 12 (fut)")
    return VARIANTS[n]


def check_state(module: nn.Module, state: dict[str, torch.Tensor], what: str, where: str) -> None:
    """Every key and shape of ``module`` against ``state``; raises :class:`CheckpointMismatch` at the first
    difference (missing key, unexpected key, other shape), with a hint for hist vs fut."""
    want = module.state_dict()
    for k, v in want.items():
        if k not in state:
            raise CheckpointMismatch(f"{where}: the {what} lacks key {k!r} that the config's architecture has "
                                     f"({len(state)} keys in the file, {len(want)} expected)")
        if tuple(state[k].shape) != tuple(v.shape):
            hint = ""
            if k == "traj_encoder.0.weight":
                got = VARIANTS.get(state[k].shape[1] // 32, "?")
                hint = (f": the checkpoint is the {got} variant but the config describes "
                        f"{VARIANTS.get(v.shape[1] // 32, '?')} (TRAJECTORY_LENGTH); use the matching YAML")
            raise CheckpointMismatch(f"{where}: {what} key {k!r} has shape {tuple(state[k].shape)} in the file, "
                                     f"{tuple(v.shape)} in the config's architecture{hint}")
    extra = [k for k in state if k not in want]
    if extra:
        raise CheckpointMismatch(f"{where}: the {what} has key {extra[0]!r} that the config's architecture lacks "
                                 f"({len(extra)} such keys); is the YAML the one this checkpoint was trained with?")


def grid_of(vae: OccFmVAE, config: str | Path) -> GridSpec:
    """The voxel grid of the VAE's config (``OCC_RANGE``, ``VOXEL_SIZE``), checked against its input size."""
    emb = vae.init_kwargs["embedding"]
    rng, vox = emb.get("occ_range"), emb.get("voxel_size")
    if rng is None or vox is None:
        raise UpstreamConfigError(f"{config}: the VAE's EMBEDDING lacks OCC_RANGE or VOXEL_SIZE")
    grid = GridSpec(tuple(float(v) for v in rng[:3]), tuple(float(v) for v in rng[3:]), float(vox[0]))
    side = vae.encoder.img_size
    if tuple(grid.shape) != (side, side, vae.grid_z):
        raise UpstreamConfigError(f"{config}: OCC_RANGE {rng} at VOXEL_SIZE {vox} is a {grid.shape} grid, but the "
                                  f"VAE takes ({side}, {side}, {vae.grid_z}) (IMG_SIZE, HEIGHT_NUM)")
    return grid


@dataclass
class ImportedOccFm:
    """The built modules with the checkpoint's weights, and what a report needs."""

    vae: OccFmVAE
    net: OccFmForecaster | None
    variant: str | None
    sampler: SamplerSettings
    latent_scale: float
    weights: UpstreamWeights
    grid: GridSpec


def import_occfm(ckpt: str | Path, config: str | Path, weights: str = "ema",
                 vae_ckpt: str | Path | None = None) -> ImportedOccFm:
    """Build the modules ``config`` describes and load ``ckpt`` into them (all checks first).

    ``vae_ckpt``: a separate VAE checkpoint whose weights replace the world-model file's VAE (rarely needed:
    a world-model file holds its VAE)."""
    cfg = load_upstream_yaml(config)
    w = read_upstream_checkpoint(ckpt, weights)
    where = str(ckpt)
    vae = OccFmVAE.from_upstream_config(cfg)
    vae_state = w.vae
    if vae_ckpt is not None:
        vae_state, where_vae = read_upstream_checkpoint(vae_ckpt, weights).vae, str(vae_ckpt)
    else:
        where_vae = where
    if not vae_state:
        raise CheckpointMismatch(f"{where_vae}: holds no VAE weights (embedding./encoder./decoder.); give --vae-ckpt")
    check_state(vae, vae_state, "VAE", where_vae)
    net, variant = None, None
    if "TRANSITION_MODEL_CONFIG" in cfg:
        kwargs = flow_section(cfg, str(config))
        variant = variant_of(kwargs)
        if not w.flow:
            raise CheckpointMismatch(f"{where}: holds no flow-net weights (transition_model.) but {config} is a "
                                     f"world-model config; give the world-model checkpoint")
        net = OccFmForecaster(net=kwargs)
        latent = (vae.latent_channels, vae.decoder.patched_size)
        if (net.latent_channels, net.net.input_size[0]) != latent:
            raise UpstreamConfigError(f"{config}: the flow net takes {net.latent_channels}×{net.net.input_size} "
                                      f"latents but the VAE makes {latent[0]}×{[latent[1]] * 2}")
        check_state(net.net, w.flow, f"flow net ({variant})", where)
        net.net.load_state_dict(w.flow, strict=True)
    elif w.flow:
        raise CheckpointMismatch(f"{where}: holds flow-net weights but {config} is a VAE config (no "
                                 f"TRANSITION_MODEL_CONFIG); give the world model's YAML")
    vae.load_state_dict(vae_state, strict=True)
    loss = loss_section(cfg)
    sampler = SamplerSettings(int(loss.get("sample_step", 10)), float(loss.get("alpha_step", 3.0)),
                              float(loss.get("uncond_scale", 2.0)))
    return ImportedOccFm(vae.eval(), None if net is None else net.eval(), variant, sampler,
                         float(loss.get("rescale_factor", 10.0)), w, grid_of(vae, config))


def stage_config(imp: ImportedOccFm, provenance: str, vae_description: dict | None) -> str:
    """The config text a snapshot stores: the occ-mfd stage that trains this architecture (what ``tools/bench.py``
    rebuilds to time training steps), as in ``configs/occfm_official/``, headed by where the weights came from.
    ``vae_description``: None for the VAE snapshot; the VAE snapshot's description for the teacher."""
    data = dict(type="occ_mfd.data.sequences.OccSequenceDataset", root="data/occ3d", split="train", past=4,
                future=6, pool=1, mask=None, stride=1)
    if vae_description is None:
        objective = dict(type="occ_mfd.objectives.vae.VAEObjective",
                         vae={"type": f"{OccFmVAE.__module__}.{OccFmVAE.__qualname__}", **imp.vae.init_kwargs},
                         loss=dict(type="occ_mfd.models.vae_loss.VAELoss", ce_weight=10.0, lovasz_weight=1.0))
    else:
        s = imp.sampler
        objective = dict(type="occ_mfd.objectives.flow_matching.OccFlowTeacher", vae=vae_description,
                         net={"type": f"{OccFmForecaster.__module__}.{OccFmForecaster.__qualname__}",
                              **imp.net.init_kwargs},
                         latent_scale=imp.latent_scale, cond_drop_prob=0.2, steps=s.steps, shift=s.shift,
                         cfg_scale=s.cfg_scale)
    lines = [f"# {line}" for line in provenance.splitlines()]
    lines += ["# The stage below trains this architecture (configs/occfm_official/); the weights are the import's.",
              f"data = {data!r}", f"objective = {objective!r}"]
    return "\n".join(lines) + "\n"


def write_snapshots(imp: ImportedOccFm, out_dir: str | Path, provenance: str) -> list[Path]:
    """``out_dir/vae.pt`` (kind "vae") and, for a world model, ``out_dir/teacher.pt`` (kind "teacher": the
    upstream sampler, 10 Euler steps, shift α = 3, CFG 2), each written atomically; plus ``import.json``."""
    out_dir = Path(out_dir)
    grid = imp.grid.to_dict()
    data = {"pool": 1, "past": 4, "future": 6, "z_convention": "occ3d"}   # trained on Occ3D-nuScenes labels
    step = imp.weights.epoch or 0
    vae_state = {k: v.detach().cpu() for k, v in imp.vae.state_dict().items()}
    vae_spec = {"class": f"{OccFmVAE.__module__}.{OccFmVAE.__qualname__}", "kwargs": imp.vae.init_kwargs}
    vae_snap = Snapshot(kind="vae", networks={"vae": vae_spec}, weights={"vae": vae_state}, grid=grid, data=data,
                        step=step, config=stage_config(imp, provenance, None), git_rev="upstream OccFM")
    snaps = {"vae.pt": vae_snap}
    if imp.net is not None:
        net_spec = {"class": f"{OccFmForecaster.__module__}.{OccFmForecaster.__qualname__}",
                    "kwargs": imp.net.init_kwargs}
        snaps["teacher.pt"] = Snapshot(
            kind="teacher", networks={"vae": vae_spec, "net": net_spec},
            weights={"vae": vae_state, "net": {k: v.detach().cpu() for k, v in imp.net.state_dict().items()}},
            latent_scale=imp.latent_scale, sampler=imp.sampler, grid=grid, data=data, step=step,
            config=stage_config(imp, provenance, vae_snap.describe()), git_rev="upstream OccFM")
    written = [save_snapshot(s, out_dir / name) for name, s in snaps.items()]
    report = {"variant": imp.variant, "weights": imp.weights.used, "note": imp.weights.note,
              "int_buffer_diffs_ema_vs_raw": imp.weights.int_buffer_diffs, "epoch": imp.weights.epoch,
              "sampler": imp.sampler.to_dict(), "latent_scale": imp.latent_scale, "provenance": provenance,
              "files": [p.name for p in written]}
    written.append(atomic_write(out_dir / "import.json", lambda f: f.write(json.dumps(report, indent=1)),
                                binary=False))
    return written
