"""A frozen backbone's BatchNorm layers folded into the convolutions that feed them, for the
bf16 forward of feature extraction.

In eval mode a BatchNorm layer is y = x * a + b per channel (a = weight / sqrt(running_var +
eps), b = bias - running_mean * a). When x is a convolution's output, scaling the
convolution's weight by a and giving it b as its bias computes the same y in the
convolution, and the layer's own pass over the activations goes: EfficientNet-Lite0's bf16
forward ran 1.01-1.22x faster folded on a 2-core AVX512-BF16 EPYC (benchmarks/README.md,
issue 33, run 8). A timm BatchNormAct2d keeps its activation (and dropout) after the fold.

Only for a bf16 forward (common/features.py decides): folding changes the rounding, and in
fp32 the cached features are the frozen backbone's own to the bit (the cached and the
on-the-fly extractor train the same head). The model itself is never changed: the fold is a
copy, and the model's weights, export and evaluation stay as they are.

Which convolution feeds which BatchNorm is read off one forward of an example (hooks: the
tensor a BatchNorm receives is the one a convolution returned), not guessed from module
names. A pair counts only when each module runs once in the forward, the BatchNorm is a plain
nn.BatchNorm2d or timm's BatchNormAct2d, in eval mode, with running statistics. Then the copy
is checked against the model on the example in fp32: if the fold changed what the model
computes (a convolution's output also used without the BatchNorm, a convolution that
transforms its weight in forward), the model is used as it is.
"""

from __future__ import annotations

import collections
import contextlib
import copy

import torch
from timm.layers import BatchNormAct2d
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


class _AfterNorm(nn.Module):
    """What a folded BatchNormAct2d still does after its normalisation: dropout, activation."""

    def __init__(self, bn: BatchNormAct2d):
        super().__init__()
        self.drop, self.act = bn.drop, bn.act

    def forward(self, x):
        return self.act(self.drop(x))


def _foldable(bn: nn.Module) -> bool:
    return (type(bn) in (nn.BatchNorm2d, BatchNormAct2d) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


@contextlib.contextmanager
def _true_fp32(device: torch.device):
    """Autocast off, and cuDNN's TF32 convolutions too (on by default on Ampere and newer
    GPUs: ~1e-3 off fp32, more than any fold, they would turn every fold down there)."""
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _pairs_and_output(model: nn.Module, example: torch.Tensor) -> tuple[list, torch.Tensor]:
    """(conv_bn_pairs, the model's fp32 output on `example`) from the one forward."""
    names = {m: n for n, m in model.named_modules()}
    produced = {}  # id(output) -> (conv, output): the output kept, so its id is not reused
    calls, pairs = collections.Counter(), []

    def after_conv(module, args, out):
        calls[module] += 1
        produced[id(out)] = (module, out)

    def before_bn(module, args):
        calls[module] += 1
        conv, out = produced.get(id(args[0]), (None, None))
        if out is args[0]:
            pairs.append((conv, module))

    handles = [m.register_forward_hook(after_conv) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(before_bn) for m in model.modules()
                if _foldable(m)]
    try:
        with _true_fp32(example.device):
            output = model(example)
    finally:
        for h in handles:
            h.remove()
    used = collections.Counter(conv for conv, _ in pairs)
    return [(names[conv], names[bn]) for conv, bn in pairs
            if calls[conv] == calls[bn] == used[conv] == 1], output


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, example: torch.Tensor) -> list:
    """[(convolution's name, BatchNorm's name)] where the BatchNorm normalises exactly what
    the convolution returned, in one forward of `example` (fp32)."""
    return _pairs_and_output(model, example)[0]


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of the eval-mode `model` with its BatchNorm layers folded into the convolutions
    that feed them, checked against `model` on `example` (a batch on the model's device); the
    model itself where nothing folds or the check fails."""
    pairs, want = _pairs_and_output(model, example)
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
        parent, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent), attr,
                nn.Identity() if type(bn) is nn.BatchNorm2d else _AfterNorm(bn))
    with _true_fp32(example.device):
        got = folded(example)
    want, got = want.float(), got.float()
    # fp32 reassociation only: ~1e-6 relative on EfficientNet-Lite0's 49 folds
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4):
        return model
    return folded
