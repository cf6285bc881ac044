"""AdamW with the reference's parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from megalodon.training.config import TrainConfig

# CEMA parameters shape the decay and frequencies of the moving average: no weight decay, as in the reference.
NO_DECAY_SUFFIXES = ("cema.alpha", "cema.delta", "cema.theta", "cema.gamma", "cema.omega", "prior_mean",
                     "prior_logv")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no decay on norms, biases (any 1-d tensor), and CEMA parameters."""
    decay, no_decay = [], []
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.dim() < 2 or name.endswith(NO_DECAY_SUFFIXES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warmup from lr * warmup_init_ratio, then linear or cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        start = cfg.lr * cfg.warmup_init_ratio
        return start + (cfg.lr - start) * step / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr + (floor - cfg.lr) * progress
