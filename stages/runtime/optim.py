"""AdamW with weight-decay groups, and the Warmup-Stable-Decay learning-rate schedule (REFERENCE.md section 2).

WSD: linear warmup from 0 to lr over `warmup_steps`, lr held through the stable phase, then a decay to min_lr over the
last `decay_fraction` of the steps. Decay shapes, with p the progress through the decay (0 -> 1):
    linear  lr - (lr - min_lr) * p
    cosine  min_lr + (lr - min_lr) * (1 + cos(pi p)) / 2
    sqrt    lr - (lr - min_lr) * sqrt(p)          ("1 - sqrt", the shape the WSD papers found best)
"""

from __future__ import annotations

import math
from fnmatch import fnmatch

import torch
from torch import nn

from presets.schema import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay: str) -> list[dict]:
    """Two AdamW groups: parameters whose name matches a `no_decay` pattern train without weight decay."""
    patterns = [p.strip() for p in no_decay.split(",") if p.strip()]
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if any(fnmatch(name, pattern) for pattern in patterns) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel (one pass per parameter) where every parameter is a plain CPU or
    CUDA float tensor, which on a CPU is several times faster than the per-tensor loop."""
    params = list(model.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p) is nn.Parameter for p in params)
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay, train.no_decay),
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        fused=fused or None,
    )


def wsd_lr(step: int, total_steps: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based) in a run of `total_steps`."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = round(train.decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return train.lr
    p = (step - decay_start + 1) / decay_steps
    drop = {
        "linear": p,
        "cosine": (1 - math.cos(math.pi * p)) / 2,
        "sqrt": math.sqrt(p),
    }[train.decay_shape]
    return train.lr - (train.lr - train.min_lr) * drop


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
