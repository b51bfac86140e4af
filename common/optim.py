"""Optimiser, parameter groups and learning-rate schedule.

Parameter groups: the new head learns at --lr; the pretrained backbone at --lr x
--backbone-lr-mult, and with --layer-decay D each backbone layer at a further D^k, k counted
from the top (timm's layer grouping for timm models; for torchvision models, the top-level
modules with Sequentials opened one level, e.g. ResNet's stem, blocks). Weight decay never
applies to biases and normalisation weights (1-d tensors): decaying a BatchNorm scale
towards 0 only fights the normalisation.

The schedule is a function of *epoch progress* (optimiser steps done / steps per epoch), and
we step it ourselves once per optimiser step instead of handing it to `accelerator.prepare`.
Accelerate's prepared scheduler steps `num_processes` times per call (it assumes a schedule
written for one process), which silently turns the tutorial's "decay every 7 epochs" into
"every 3.5 epochs" on 2 processes. Measured in epochs, the learning rate at a given epoch is
the same on any number of processes and with any gradient accumulation. Each group's lr is
its own peak (lr x its scale) times the same schedule factor.
"""

from __future__ import annotations

import math
from typing import Optional, TYPE_CHECKING

import torch
from torch import nn

from common.models import in_heads


if TYPE_CHECKING:  # names for the type hints only
    from common.config import TrainConfig
    from torch.optim.lr_scheduler import LRScheduler


def _torchvision_layers(model):
    """Parameter name -> layer index, bottom to top: each top-level module with parameters
    is a layer, except that nn.Sequential children are opened one level (ResNet's layer1.0,
    layer1.1, ...; EfficientNet's features.0, features.1, ...)."""
    layers, index = {}, 0
    for name, child in model.named_children():
        parts = (list(child.named_children()) if isinstance(child, nn.Sequential)
                 else [("", child)])
        for sub, module in parts:
            prefix = f"{name}.{sub}." if sub else f"{name}."
            names = [prefix + n for n, _ in module.named_parameters()]
            if names:
                layers.update(dict.fromkeys(names, index))
                index += 1
    return layers


def layer_ids(model: nn.Module) -> dict:
    """Parameter name -> layer index (0 = input side) for layer-wise lr decay."""
    if hasattr(model, "group_matcher"):  # timm models
        from timm.models import group_parameters

        return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    return _torchvision_layers(model)


def param_groups(model: nn.Module, head_names: tuple, cfg: TrainConfig, lr: float) -> list:
    """Optimiser groups of the parameters of `model` (all of them, trainable now or later):
    the head first, then the backbone by lr scale; each split into decayed (>= 2-d) and
    not decayed (biases, norm weights). Each group records `name` and `lr_scale`."""
    backbone_mult = getattr(cfg, "backbone_lr_mult", 1.0)
    decay = getattr(cfg, "layer_decay", None)
    in_head = lambda n: in_heads(n, head_names)  # noqa: E731
    depth = layer_ids(model) if decay else {}
    top = max((d for n, d in depth.items() if not in_head(n)), default=0) + 1
    groups = {}
    for name, p in model.named_parameters():
        if in_head(name):
            key, scale = "head", 1.0
        elif decay:
            k = top - depth[name]  # the top backbone layer: k = 1
            key, scale = f"backbone.{depth[name]}", backbone_mult * decay ** k
        else:
            key, scale = "backbone", backbone_mult
        wd = cfg.weight_decay if p.ndim > 1 else 0.0
        group = groups.setdefault((key, wd), dict(params=[], name=key, lr_scale=scale,
                                                  lr=lr * scale, weight_decay=wd))
        group["params"].append(p)
    # head first (its lr is the one logged as train/lr), then the backbone from the top
    return sorted(groups.values(), key=lambda g: (g["name"] != "head", -g["lr_scale"]))


def build_optimizer(cfg: TrainConfig, model: nn.Module, head_names: tuple = (),
                    lr: Optional[float] = None) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over `param_groups`. Parameters frozen for now (requires_grad
    False) are included: they get no gradient, so the optimiser leaves them and their state
    alone until they are unfrozen, and the optimiser never has to be rebuilt (or its
    checkpoint re-mapped) when --freeze-epochs ends."""
    lr = cfg.lr if lr is None else lr
    if lr == "auto":  # placeholder: the range test (or a resumed checkpoint) sets it
        lr = 1.0
    groups = param_groups(model, head_names, cfg, lr)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def group_lrs(optimizer: torch.optim.Optimizer) -> dict:
    """{group name: lr}, one entry per name (decay / no-decay halves share their lr)."""
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}


def set_peak_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group lr x its scale (used by --lr auto before the schedule is built)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr for optimiser step `step` (0-based) of one process."""
    progress = step / steps_per_epoch  # in epochs
    if cfg.scheduler == "onecycle":
        # torch's OneCycleLR shape: cosine up from peak/25 over the warmup (default: 30% of
        # the epochs), then cosine down to ~0 at the end
        up = cfg.warmup_epochs or 0.3 * cfg.epochs
        if progress < up:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * progress / up))
        span = max(cfg.epochs - up, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min((progress - up) / span, 1.0)))
    if cfg.warmup_epochs > 0 and progress < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)  # first step already > 0
    if cfg.scheduler == "step":  # tutorial: StepLR(step_size=7, gamma=0.1) once per epoch
        return cfg.gamma ** int(progress // cfg.step_size)
    if cfg.scheduler == "cosine":  # from 1 after warmup down towards 0 at the end
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min((progress - cfg.warmup_epochs) / span, 1.0)))
    return 1.0


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> LRScheduler:
    """LambdaLR over optimiser steps; `steps_per_epoch` counts the optimiser steps (after
    gradient accumulation) of one process in one epoch. Every group follows the same factor
    of its own peak lr."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))


def position_scheduler(scheduler: LRScheduler, step: int) -> None:
    """Put a freshly built schedule at optimiser step `step` (a resumed run): nothing of it
    is saved, it is a function of the step (and of the peaks it was built with)."""
    scheduler.last_epoch = step
    lrs = [base * f(step) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
