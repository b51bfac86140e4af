"""--model-ema: an exponential moving average of the trained weights (and BatchNorm buffers).

Updated after every optimiser step the optimiser actually took; evaluated every epoch beside
the live weights; whichever scores better on val can become best/. Its tensors go into every
checkpoint (ema.safetensors), so a resumed run continues the same average. Every process
keeps the same average: the weights it averages are the same on all of them.
"""

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class ModelEma:
    def __init__(self, module, decay):
        self.model = AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                   use_buffers=True)
        self.model.eval()

    @torch.no_grad()
    def update(self, module):
        self.model.update_parameters(module)

    @property
    def module(self):
        return self.model.module

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
