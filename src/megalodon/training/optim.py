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


# Devices whose AdamW has one fused kernel for every parameter: a few launches a step instead of a dozen per
# tensor group, and the step counts kept on the device (the multi-tensor path reads them on the host).
FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, cfg.weight_decay)
    fused = all(p.device.type in FUSED_ADAMW_DEVICES for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True if fused else None)  # None: torch picks the multi-tensor path


def lr_at(step: int, cfg: TrainConfig, max_steps: int, restart: tuple[int, float] | None = None) -> float:
    """Linear warmup from lr * warmup_init_ratio, then linear or cosine decay to lr * min_lr_ratio at max_steps.

    restart = (step0, lr0): from step0 on, decay from lr0 instead of lr. A run extended or shortened after its
    warmup continues its decay from where it stands, with no jump (a finished run stays at its floor)."""
    if restart is not None and step >= restart[0]:
        start_step, start_lr = restart
    elif step < cfg.warmup_steps:
        start = cfg.lr * cfg.warmup_init_ratio
        return start + (cfg.lr - start) * step / cfg.warmup_steps
    else:
        start_step, start_lr = cfg.warmup_steps, cfg.lr
    progress = min(1.0, (step - start_step) / max(1, max_steps - start_step))
    floor = cfg.lr * cfg.min_lr_ratio
    remaining = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return floor + (start_lr - floor) * remaining


def changed_length(cfg: TrainConfig, step: int, max_steps: int, restart: tuple[int, float] | None,
                   saved_budget: float | None) -> tuple[int, tuple[int, float] | None, str] | None:
    """A resumed run's new length, where cfg.max_steps differs from the run's (max_steps, 0 while a time budget
    decides): (max_steps, lr restart, the plan in words), or None for no change. After warmup the lr decay goes on
    from where it stands to the floor at the new end, with no jump; a finished run trains on at its floor."""
    if max_steps and cfg.time_budget_min != saved_budget:  # a budget decides nothing once max_steps is set
        raise ValueError(f"this run's length is fixed at {max_steps} steps; change it with --max_steps N, not "
                         "--time_budget_min")
    if cfg.max_steps in (0, max_steps):
        return None
    if cfg.max_steps < step:
        raise ValueError(f"the run is already at step {step}: --max_steps {cfg.max_steps} is behind it; give at "
                         f"least {step}")
    if step < cfg.warmup_steps:
        return cfg.max_steps, restart, f"the schedule after warmup is planned for {cfg.max_steps} steps"
    restart = (step, lr_at(step, cfg, max_steps or 10 ** 9, restart))
    return cfg.max_steps, restart, (f"the learning rate decays from {restart[1]:.3g} (its value at step {step}) to "
                                    f"{cfg.lr * cfg.min_lr_ratio:.3g} at step {cfg.max_steps}")
