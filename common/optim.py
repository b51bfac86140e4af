"""Optimiser and learning-rate schedule.

The schedule is a function of *epoch progress* (optimiser steps done / steps per epoch), and
we step it ourselves once per optimiser step instead of handing it to `accelerator.prepare`.
Accelerate's prepared scheduler steps `num_processes` times per call (it assumes a schedule
written for one process), which silently turns the tutorial's "decay every 7 epochs" into
"every 3.5 epochs" on 2 processes. Measured in epochs, the learning rate at a given epoch is
the same on any number of processes and with any gradient accumulation.
"""

import math

import torch


def build_optimizer(cfg, params):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(cfg, step, steps_per_epoch):
    """Multiplier of the peak lr for optimiser step `step` (0-based) of one process."""
    progress = step / steps_per_epoch  # in epochs
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)  # first step already > 0
    if cfg.scheduler == "step":  # tutorial: StepLR(step_size=7, gamma=0.1) once per epoch
        return cfg.gamma ** int(progress // cfg.step_size)
    if cfg.scheduler == "cosine":  # from 1 after warmup down towards 0 at the end
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min((progress - cfg.warmup_epochs) / span, 1.0)))
    return 1.0


def build_scheduler(cfg, optimizer, steps_per_epoch):
    """LambdaLR over optimiser steps; `steps_per_epoch` counts the optimiser steps (after
    gradient accumulation) of one process in one epoch."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))
