"""One AdamW per parameter group of an objective, with OccFM's weight-decay exclusions.

No weight decay on (OccFM, and GPT-2/nanoGPT practice): biases and other 1-D tensors (norm gains), the
parameters of normalisation and ``nn.Embedding`` layers, and directly-owned parameters whose name contains
``emb`` (learned positional / time embeddings) on modules that are not Linear/Conv layers.
"""
from __future__ import annotations


import torch
from torch import nn

from occ_mfd.engine.schedule import lr_factor

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)
_WEIGHTS = (nn.Linear, nn.modules.conv._ConvNd)
GROUP_KEYS = {"lr", "weight_decay", "betas", "eps", "grad_clip", "warmup_steps", "schedule", "min_lr_ratio"}


def no_decay_ids(model: nn.Module) -> set[int]:
    """ids of the parameters of ``model`` that get no weight decay (rule in the module docstring)."""
    out = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            rms = getattr(nn, "RMSNorm", ())
            if (p.ndim <= 1 or isinstance(module, (*_NORMS, nn.Embedding)) or (rms and isinstance(module, rms))
                    or ("emb" in name.lower() and not isinstance(module, _WEIGHTS))):
                out.add(id(p))
    return out


def build_optimizers(objective: nn.Module, optim_cfg: dict) -> dict[str, torch.optim.AdamW]:
    """``optim_cfg``: group name → dict(lr, weight_decay, betas, eps, grad_clip, …) for every group of
    ``objective.param_groups()``. Each AdamW has two torch param groups: decayed and not decayed."""
    groups = objective.param_groups()
    missing, extra = sorted(set(groups) - set(optim_cfg)), sorted(set(optim_cfg) - set(groups))
    if missing or extra:
        raise KeyError(f"config 'optim' must have one entry per objective param group {sorted(groups)}; "
                       f"missing {missing}, unknown {extra}")
    seen: dict[int, str] = {}
    skip = no_decay_ids(objective)
    opts = {}
    for name, params in groups.items():
        cfg = dict(optim_cfg[name])
        bad = sorted(set(cfg) - GROUP_KEYS)
        if bad:
            raise KeyError(f"config optim.{name}: unknown keys {bad} (allowed: {sorted(GROUP_KEYS)})")
        if "lr" not in cfg:
            raise KeyError(f"config optim.{name}: 'lr' is required")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"objective.param_groups(): a parameter is in both {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
        decay = [p for p in params if id(p) not in skip]
        no_decay = [p for p in params if id(p) in skip]
        torch_groups = [{"params": decay, "weight_decay": float(cfg.get("weight_decay", 0.0))},
                        {"params": no_decay, "weight_decay": 0.0}]
        opts[name] = torch.optim.AdamW([g for g in torch_groups if g["params"]], lr=float(cfg["lr"]),
                                       betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=float(cfg.get("eps", 1e-8)))
        for g in opts[name].param_groups:
            g["base_lr"] = float(cfg["lr"])
    return opts


def set_lr(opt: torch.optim.Optimizer, group_cfg: dict, train_cfg: dict, step: int) -> float:
    """Set the lr of ``opt`` for ``step`` (per-group schedule keys override the ``train`` ones)."""
    f = lr_factor(step, int(train_cfg["max_steps"]),
                  int(group_cfg.get("warmup_steps", train_cfg["warmup_steps"])),
                  group_cfg.get("schedule", train_cfg["schedule"]),
                  float(group_cfg.get("min_lr_ratio", train_cfg["min_lr_ratio"])))
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * f
    return opt.param_groups[0]["lr"]


def clip_grads(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the global L2 norm of ``params``' grads to ``max_norm`` (None: no clipping); returns the norm
    before clipping (nan/inf when a gradient is non-finite)."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    # max_norm=inf scales by clamp(inf / norm, max=1) = 1 exactly: a plain norm, portable to torch 2.1.
    return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm=float("inf") if max_norm is None else max_norm))


