"""The phase of a run: which parameters train this epoch (--freeze-epochs: the heads alone
first, then every layer; the extractor: the heads always), with DDP built around exactly
those, and train/eval mode that keeps a frozen backbone's BatchNorm statistics as they are."""

from __future__ import annotations

from typing import Callable, Optional, TYPE_CHECKING

import torch

from common.accelerator import bare_model
from common.models import freeze_backbone, set_train_mode

if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from torch import nn


class Phase:
    """Freezes and unfreezes the backbone of the module that trains, epoch by epoch.

    `freeze_epochs`: head-only epochs first (0: every layer from the start); None: the
    backbone never trains (the extractor on the fly). `head_names`: the heads inside the
    trained module (() when it is the heads alone: nothing to freeze)."""

    def __init__(self, head_names: tuple, freeze_epochs: Optional[int], bn_eval: bool = False):
        self.head_names, self.freeze_epochs, self.bn_eval = head_names, freeze_epochs, bn_eval
        self.frozen: Optional[bool] = None  # as the module's parameters are now

    def frozen_at(self, epoch: int) -> bool:
        """Whether the backbone is frozen (parameters and BatchNorm statistics) in `epoch`."""
        return self.freeze_epochs is None or epoch < self.freeze_epochs

    def set(self, module: torch.nn.Module, frozen: bool) -> None:
        """Freeze or unfreeze `module` (the bare one: before DDP is built around it)."""
        freeze_backbone(module, self.head_names, frozen)
        self.frozen = frozen

    def enter(self, accelerator: Accelerator, model: nn.Module, epoch: int,
              say: Optional[Callable] = None) -> nn.Module:
        """The prepared `model` set for `epoch`: frozen or not (DDP built again when that
        changes, so that it registers exactly the parameters that train), in train mode
        (a frozen backbone in eval mode). Returns the model to train (maybe a new wrapper)."""
        frozen = self.frozen_at(epoch)
        if frozen != self.frozen:
            self.set(bare_model(accelerator, model), frozen)
            model = rewrap_ddp(accelerator, model)
        set_train_mode(bare_model(accelerator, model), self.head_names, frozen, self.bn_eval)
        if self.freeze_epochs and say is not None:
            say(f"epoch {epoch + 1}: " + ("head only (backbone and its BatchNorm statistics "
                                          "frozen)" if frozen else "every layer trains"))
        return model


def rewrap_ddp(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """Build DDP again around the same module, after parameters were frozen or unfrozen.

    DDP registers the parameters that require grad when it is built and expects a gradient
    for each of them in every backward. --freeze-epochs therefore wraps the model with only
    the heads trainable, and again with every parameter when the backbone unfreezes: both
    phases run without `find_unused_parameters` (a graph walk per step). A parameter frozen
    when DDP was built would never be synchronised after unfreezing, which is why the wrap
    is renewed, not kept. Single-process models are returned as they are."""
    compiled = hasattr(model, "_orig_mod")  # --compile: DDP inside torch.compile's wrapper
    ddp = model._orig_mod if compiled else model
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return model
    # (Accelerate keeps the unwrapped module in its list of models: nothing to update there)
    new = torch.nn.parallel.DistributedDataParallel(
        ddp.module, device_ids=ddp.device_ids, output_device=ddp.output_device)
    return torch.compile(new) if compiled else new
