"""--model-ema: an exponential moving average of the trained weights (and BatchNorm buffers).

Updated after every optimiser step the optimiser actually took; evaluated every epoch beside
the live weights; whichever scores better on val can become best/. Its tensors go into every
checkpoint (ema.safetensors) and its update count into the train state, so a resumed run
continues the same average.

The average itself is timm's ModelEmaV3 (one `_foreach_lerp_` over the state's tensors, all
on the model's device). Its decay warms up for short runs: after t updates it is
min(--model-ema-decay, 1 - (1 + t) ** -0.75) (0.91 after 25 steps, 0.977 after 150), so an
average over a few hundred steps follows the training instead of holding on to the new
head's random start (a fixed 0.998 still weighs the start 0.74 after 150 steps). The count
is a Python int: nothing is copied between host and device per update (torch's
AveragedModel keeps its count in a CPU tensor and copies it to the GPU every step).

On several processes the weights are the same on every rank, but BatchNorm statistics are
each rank's own (DDP broadcasts rank 0's at each forward, then every rank updates them with
its own batch): `sync` gives every rank rank 0's average before it is evaluated or saved, so
all ranks score and keep the same model.
"""

from __future__ import annotations

from typing import Optional, TYPE_CHECKING

import torch
from accelerate.utils import broadcast
from timm.utils.model_ema import ModelEmaV3

if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from torch import nn

WARMUP_POWER = 0.75  # timm: 3/4 for runs of up to ~100k steps, 2/3 for longer ones


def ema_decay(max_decay: float, updates: int) -> float:
    """The weight of the old average at the update after `updates` earlier ones."""
    return min(max_decay, 1.0 - (1.0 + updates) ** -WARMUP_POWER)


class ModelEma:
    def __init__(self, module, decay, updates=0):
        self.updates = updates  # updates made (the train state keeps it across a resume)
        # timm's step s gives decay 1 - s' ** -power with s' = s - 1 (0 at the first update:
        # a copy), i.e. ema_decay(decay, s - 1); fp32 weights, so no stochastic rounding
        self.ema = ModelEmaV3(module, decay=decay, use_warmup=True, warmup_power=WARMUP_POWER,
                              stochastic_rounding=False)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        self.ema.update(module, step=self.updates)

    @torch.no_grad()
    def sync(self, accelerator: Accelerator) -> None:
        """Every process: rank 0's average (a no-op on one process)."""
        if accelerator.num_processes == 1:
            return
        for t in self.ema.module.state_dict().values():
            t.copy_(broadcast(t.clone(), from_process=0))

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def state_dict(self) -> dict:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict, updates: Optional[int] = None) -> None:
        """Tensors of `state_dict()`; checkpoints written before the count moved to the train
        state carry it as `n_averaged` (and their keys under `module.`)."""
        state = dict(state)
        n_averaged = state.pop("n_averaged", None)
        state = {k[len("module."):] if k.startswith("module.") else k: v
                 for k, v in state.items()}
        self.ema.module.load_state_dict(state)
        if updates is None and n_averaged is not None:
            updates = int(n_averaged)
        self.updates = int(updates or 0)
