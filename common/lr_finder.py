"""LR range test (Smith 2015; fastai's lr_find, Lightning's Tuner.lr_find), safe under N
processes.

Train for `--find-lr-steps` optimiser steps while the learning rate grows exponentially from
1e-7 to 10 (every group keeps its scale: backbone mult, layer decay), record the loss
smoothed with an exponential moving average (debiased), stop early once it diverges (4x its
minimum, or not finite), and suggest a tenth of the lr at the minimum smoothed loss: a step
size still well inside the region where the loss falls fast. A loss that never falls
(MIN_FALL below its highest point before the minimum) has no such region: then there is no
suggestion (--lr auto falls back to the default lr, saying so) rather than the sweep's first
lr / 10, at which nothing trains. That happens when the model already sits in a minimum,
e.g. a head trained to convergence on frozen features (LP-FT's start).

Multi-process: each step's loss is averaged over processes (`accelerator.reduce`) before any
decision, so every rank sees the same curve, stops at the same step and suggests the same lr;
the hangs seen in other finders come from ranks that disagree on when to stop.

Afterwards the model (parameters and BatchNorm buffers), the optimiser state, the
gradient-accumulation counter and the RNG states are restored exactly, so training that
follows is the run you would get by passing the suggested lr yourself.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Callable, Iterable, Optional, TYPE_CHECKING

import torch

from common.checkpoint import TrainState
from common.data import set_epoch
from common.engine import train_epoch
from common.errors import RunFailure
from common.log import logger
from common.models import set_train_mode
from common.optim import set_peak_lr
from common.accelerator import bare_model


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig
    from torch import nn

START_LR, END_LR, BETA, DIVERGE = 1e-7, 10.0, 0.98, 4.0
MIN_FALL = 0.1  # the smoothed loss must fall 10% for a suggestion


def _snapshot(accelerator, model, optimizer):
    module = bare_model(accelerator, model)
    return dict(model={k: v.detach().clone() for k, v in module.state_dict().items()},
                optimizer=copy.deepcopy(optimizer.state_dict()),
                scaler=copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler
                else None,
                cpu_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _restore(accelerator, model, optimizer, saved):
    bare_model(accelerator, model).load_state_dict(saved["model"])  # copies in place
    optimizer.load_state_dict(saved["optimizer"])
    optimizer.zero_grad(set_to_none=True)
    if saved["scaler"] is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["cpu_rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    accelerator.step = 0  # gradient-accumulation counter: the next batch opens a window


def suggest(lrs: list, smoothed: list) -> tuple[Optional[float], int]:
    """(suggested lr, index of the minimum): a tenth of the lr at the minimum smoothed loss,
    or None where the loss never fell MIN_FALL below its highest point before the minimum."""
    best = min(range(len(smoothed)), key=smoothed.__getitem__)
    # from the highest point before the minimum, not from the first step: one batch is noisy
    # (a first batch that happens to be easy would hide a fall that follows)
    if smoothed[best] > (1 - MIN_FALL) * max(smoothed[:best + 1]):
        return None, best
    return lrs[best] / 10, best


class _StepLosses:
    """Collects each micro-batch's mean loss of the optimiser step in progress (as a `Sums`
    of train_epoch would collect sums)."""

    def __init__(self):
        self.means = []

    def add(self, per_sample, correct, weight):
        self.means.append(per_sample.mean())


def find_lr(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
            loader: Iterable, cfg: TrainConfig, *, output_dir: str, loss_fn: Callable,
            mix: Optional[Callable] = None, head_names: tuple = (), frozen: bool = False,
            bn_eval: bool = False, channels_last: bool = False) -> Optional[float]:
    """Run the range test on the prepared model/optimizer/loader, with the backbone frozen or
    not (as the model's parameters already are), through the training step of every run;
    return the suggested peak lr (of the head; the other groups scale with it), or None
    where the loss never fell. Writes lr_find.json and lr_find.png."""
    steps = cfg.find_lr_steps
    saved = _snapshot(accelerator, model, optimizer)
    set_train_mode(bare_model(accelerator, model), head_names, frozen, bn_eval)
    lrs, raw, smoothed = [], [], []
    avg, epoch, done = 0.0, 0, False
    state = TrainState(epoch=-1)  # the range test's own count (-1: seeds its mixes apart)
    step_losses = _StepLosses()

    def lr_of_next_step():
        return START_LR * (END_LR / START_LR) ** (len(lrs) / (steps - 1))

    lr = lr_of_next_step()
    set_peak_lr(optimizer, lr)
    while not done:
        set_epoch(loader, epoch)
        for _ in train_epoch(model, loader, optimizer, None, state, loss_fn=loss_fn,
                             sums=(step_losses,), accelerator=accelerator, mix=mix,
                             channels_last=channels_last):
            # one sync per step (a range test decides at every step), the same number on
            # every rank: every decision below is taken together
            value = accelerator.reduce(torch.stack(step_losses.means).mean(), "mean").item()
            step_losses.means = []
            if not math.isfinite(value):
                done = True
                break
            avg = BETA * avg + (1 - BETA) * value
            lrs.append(lr)
            raw.append(value)
            smoothed.append(avg / (1 - BETA ** len(lrs)))
            if smoothed[-1] > DIVERGE * min(smoothed) or len(lrs) >= steps:
                done = True
                break
            lr = lr_of_next_step()
            set_peak_lr(optimizer, lr)
        else:
            epoch += 1
    _restore(accelerator, model, optimizer, saved)
    if len(lrs) < 5:
        raise RunFailure(f"--find-lr: the loss diverged after {len(lrs)} steps, from lr "
                        f"{START_LR:g}; check the data and model, or set --lr yourself")
    lr, best = suggest(lrs, smoothed)
    logger.info(f"LR range test: {len(lrs)} steps, lr {lrs[0]:.1e} -> {lrs[-1]:.1e}; "
                f"minimum smoothed loss {smoothed[best]:.4f} at lr {lrs[best]:.2e}; "
                + (f"suggested --lr {lr:.2e} (a tenth of that)" if lr else
                   f"no suggestion: the loss never fell {MIN_FALL:.0%} below where it "
                   f"was ({max(smoothed[:best + 1]):.4f}), so no lr is better than "
                   "another here; set --lr yourself (see lr_find.png)"))
    if lr and best == len(smoothed) - 1:
        logger.info("note: the loss was still falling at the end of the sweep (no "
                    "divergence), so the suggestion may be low; see lr_find.png")
    if accelerator.is_main_process:
        from common.files import write_json
        from common.viz import lr_find_png

        write_json(os.path.join(output_dir, "lr_find.json"),
                   dict(suggested_lr=lr, lr=lrs, loss=raw, smoothed_loss=smoothed))
        lr_find_png(lrs, smoothed, lr, os.path.join(output_dir, "lr_find.png"))
    return lr
