"""Reading the upstream OccFM YAML configs (``tools/cfgs/*.yaml`` of Orbis36/OccFM-NeurIPS2025).

A config may include another through ``_BASE_CONFIG_: tools/cfgs/...``, a path relative to the root of an
upstream checkout. We resolve it by walking up from the including YAML's folder until the path exists, so a
copy of the ``tools/cfgs/`` tree anywhere works (and so does a YAML saved beside a run's ``ckpt/`` folder inside
a checkout). Merging follows upstream: the included file first, then the including mapping's keys on top,
recursively for nested mappings. Constructor kwargs are the YAML keys lower-cased (upstream does the same).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class UpstreamConfigError(ValueError):
    """A YAML that is not a readable upstream OccFM config (names the file and what is wrong)."""


def _resolve_include(include: str, including: Path) -> Path:
    inc = Path(include)
    if inc.is_absolute():
        if inc.exists():
            return inc
        tried = [inc]
    else:
        tried = []
        for folder in [including.parent, *including.parent.parents]:
            cand = folder / inc
            tried.append(cand)
            if cand.exists():
                return cand
    raise UpstreamConfigError(
        f"{including}: _BASE_CONFIG_ {include!r} not found (looked in every folder from {including.parent} up to "
        f"{tried[-1].parent if tried else '/'}); copy the upstream tools/cfgs/ tree beside the YAML, keeping its "
        "folder layout")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UpstreamConfigError(f"{path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UpstreamConfigError(f"{path}: not a YAML file ({e})") from None
    if not isinstance(data, dict):
        raise UpstreamConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def _merge(into: dict, new: dict, source: Path) -> dict:
    if "_BASE_CONFIG_" in new:
        base_path = _resolve_include(str(new["_BASE_CONFIG_"]), source)
        into.update(load_upstream_yaml(base_path))
    for key, val in new.items():
        if key == "_BASE_CONFIG_":
            continue
        if isinstance(val, dict):
            sub = into.get(key)
            into[key] = _merge(dict(sub) if isinstance(sub, dict) else {}, val, source)
        else:
            into[key] = val
    return into


def load_upstream_yaml(path: str | Path) -> dict:
    """The YAML at ``path`` with every ``_BASE_CONFIG_`` include merged in (upstream's merge order)."""
    path = Path(path)
    return _merge({}, _read_yaml(path), path)


def lowercase_keys(d: Any) -> Any:
    """Upstream's convention: YAML keys lower-cased become constructor kwargs (recursively)."""
    if isinstance(d, dict):
        return {str(k).lower(): lowercase_keys(v) for k, v in d.items()}
    return d


def _section(cfg: dict, path: str, where: str) -> dict:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UpstreamConfigError(f"{where}: missing {path} (stopped at {part!r}); is this an OccFM config?")
        node = node[part]
    if not isinstance(node, dict):
        raise UpstreamConfigError(f"{where}: {path} is not a mapping")
    return node


def vae_sections(cfg: dict, where: str = "config") -> dict[str, dict]:
    """``{"embedding", "encoder", "decoder"}`` constructor kwargs (lower-cased) of the VAE in a world-model or VAE
    config (``COMPRESSOR_CONFIG.MODEL.{EMBEDDING,ENCODER,DECODER}``)."""
    model = _section(cfg, "COMPRESSOR_CONFIG.MODEL", where)
    return {name.lower(): lowercase_keys(_section(model, name, where)) for name in ("EMBEDDING", "ENCODER", "DECODER")}


def flow_section(cfg: dict, where: str = "config") -> dict:
    """Constructor kwargs (lower-cased) of the flow net (``TRANSITION_MODEL_CONFIG.MODEL.TRANSITION_MODEL``)."""
    return lowercase_keys(_section(cfg, "TRANSITION_MODEL_CONFIG.MODEL.TRANSITION_MODEL", where))


def loss_section(cfg: dict) -> dict:
    """The sampling / guidance recipe (``LOSS``: UNCOND_P, RESCALE_FACTOR, SAMPLE_STEP, ALPHA_STEP, UNCOND_SCALE)."""
    return lowercase_keys(cfg.get("LOSS", {}) or {})
