"""--model-ema: an exponential moving average of the trained weights (and BatchNorm buffers).

Updated after every optimiser step the optimiser actually took; evaluated every epoch beside
the live weights; whichever scores better on val can become best/. Its tensors go into every
checkpoint (ema.safetensors), so a resumed run continues the same average. Every process
keeps the same average: the weights it averages are the same on all of them.

The decay warms up as timm's ModelEmaV3 does for short runs: after t updates it is
min(--model-ema-decay, 1 - (1 + t) ** -0.75) (0.91 after 25 steps, 0.977 after 150), so an
average over a few hundred steps follows the training instead of holding on to the new
head's random start (a fixed 0.998 still weighs the start 0.74 after 150 steps).
"""

import torch
from torch.optim.swa_utils import AveragedModel

WARMUP_POWER = 0.75  # timm: 3/4 for runs of up to ~100k steps, 2/3 for longer ones


def ema_decay(max_decay, updates):
    """The weight of the old average at the update after `updates` earlier ones."""
    return min(max_decay, 1.0 - (1.0 + updates) ** -WARMUP_POWER)


class ModelEma:
    def __init__(self, module, decay):
        self.max_decay, self.updates = decay, 0  # a Python count: no device sync per step
        self.model = AveragedModel(module, multi_avg_fn=self._lerp, use_buffers=True)
        self.model.eval()

    @torch.no_grad()
    def _lerp(self, averages, currents, _):
        decay = ema_decay(self.max_decay, self.updates - 1)  # the first update copies
        if torch.is_floating_point(averages[0]):
            torch._foreach_lerp_(averages, currents, 1.0 - decay)
        else:  # integer buffers (BatchNorm's num_batches_tracked): the latest value
            for average, current in zip(averages, currents):
                average.copy_(current)

    @torch.no_grad()
    def update(self, module):
        self.updates += 1
        self.model.update_parameters(module)

    @property
    def module(self):
        return self.model.module

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
        self.updates = int(state["n_averaged"])
