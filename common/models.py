"""Backbones from torchvision and timm, named as their users write them.

A bare name is torchvision's when torchvision has it (`resnet18`, the tutorial's), else
timm's (`tf_efficientnet_lite0`, `convnext_tiny.fb_in22k`, `vit_small_patch16_224`);
`torchvision:NAME`, `timm:NAME` and `hf-hub:ORG/NAME` (a timm model on the Hugging Face Hub)
choose explicitly. `efficientnet_lite0`, this project's former name of its default, is
timm's `tf_efficientnet_lite0` (timm's own `efficientnet_lite0` is `timm:efficientnet_lite0`).

`build_model` returns the network with fresh heads sized to the classes, the qualified names
of those heads (everything else is "the backbone"; distilled models such as DeiT's have two,
`head` and `head_dist`), and the preprocessing the pretrained weights expect (input size,
resize, mean/std, interpolation), read from the library's own pretrained config so nothing is
hard-coded here.

Weights: the library's download/cache by default, `--weights FILE` for a local file
(safetensors, or a torch file loaded with `weights_only=True`, which refuses pickled code),
or none (`--no-pretrained`). The head of a weights file is dropped when its shape differs
(an ImageNet head on a 2-class problem); any other mismatch is an error naming the layers.
"""

import dataclasses
import difflib
import functools
import math
import os
import urllib.error
from typing import Optional

import torch
from torch import nn

from common.errors import RunFailure, UserError
from common.log import logger


@dataclasses.dataclass
class Network:
    """A classifier built for this data, and the part of it that trains.

    `model` is the whole network (what best/ holds) and `head_names` its new classifier
    modules; everything else in it is the backbone. On cached features (the extractor's
    default, the fine-tune's linear probe) the heads alone train, as `feature_heads`
    (common/features.py FeatureHeads, sharing the heads' parameters with `model`)."""

    model: nn.Module
    head_names: tuple          # qualified names of the classifier module(s) in `model`
    preprocessing: dict        # input_size, resize, mean, std, interpolation
    feature_heads: Optional[nn.Module] = None
    channels_last: bool = False  # images in channels-last memory format (hardware.py)

    @property
    def trained(self) -> nn.Module:
        """The module the optimiser updates: the heads on cached features, or the model."""
        return self.model if self.feature_heads is None else self.feature_heads

    @property
    def trained_head_names(self) -> tuple:
        """The heads inside `trained` (() when `trained` is the heads alone)."""
        return self.head_names if self.feature_heads is None else ()


def in_heads(name: str, head_names: tuple) -> bool:
    """Whether parameter/module `name` belongs to one of `head_names` (() = everything)."""
    return not head_names or any(name == h or name.startswith(h + ".") for h in head_names)


def split_model_name(name: str) -> tuple[str, str]:
    """(library, architecture): 'resnet18' -> ('torchvision', 'resnet18'); 'convnext_tiny.fb_in22k'
    (torchvision lacks it) or 'timm:convnext_tiny' -> ('timm', ...); 'hf-hub:ORG/NAME' ->
    ('timm', 'hf-hub:ORG/NAME'); 'efficientnet_lite0' -> ('timm', 'tf_efficientnet_lite0')."""
    from common.pretrained import ALIASES

    name = ALIASES.get(name, name)
    if name.startswith("hf-hub:"):
        return "timm", name
    library, sep, arch = name.partition(":")
    if sep:
        return library, arch
    return ("torchvision" if name in _torchvision_names() else "timm"), name


@functools.lru_cache(maxsize=None)
def _torchvision_names():
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))  # classification


@functools.lru_cache(maxsize=None)
def _timm_names():
    import timm

    return tuple(timm.list_models())


def check_model_name(name: str) -> None:
    """Raise ValueError, with close names as suggestions, unless `name` is a known model."""
    library, arch = split_model_name(name)
    if library not in ("torchvision", "timm"):
        raise ValueError(f"unknown library '{library}' in '{name}': use NAME, timm:NAME, "
                         "torchvision:NAME or hf-hub:ORG/NAME")
    if arch.startswith("hf-hub:"):  # the Hub says whether it exists when it is fetched
        return
    known = _torchvision_names() if library == "torchvision" else _timm_names()
    if "." in arch and library == "timm":  # NAME.TAG: one of the model's pretrained weights
        import timm

        known = timm.list_pretrained()
    if arch in known:
        return
    if ":" in name:
        close = [f"{library}:{c}"
                 for c in difflib.get_close_matches(arch, known, n=3, cutoff=0.6)]
        raise ValueError(f"no {library} model named '{arch}'"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    if "." not in arch:
        known = tuple(dict.fromkeys(_torchvision_names() + _timm_names()))  # resnet18 once
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    raise ValueError(f"no torchvision or timm model named '{arch}'"
                     + (f"; did you mean {', '.join(close)}?" if close else ""))


def _interp_name(mode):
    return getattr(mode, "value", mode)  # torchvision InterpolationMode -> "bilinear"


def _preprocessing_torchvision(arch):
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    t = weights.transforms()
    return dict(input_size=int(t.crop_size[0]), resize=int(t.resize_size[0]),
                mean=list(t.mean), std=list(t.std), interpolation=_interp_name(t.interpolation))


def _preprocessing_timm(model):
    import timm.data

    c = timm.data.resolve_data_config({}, model=model)
    size = int(c["input_size"][-1])
    return dict(input_size=size, resize=int(math.floor(size / c["crop_pct"])),
                mean=list(c["mean"]), std=list(c["std"]), interpolation=c["interpolation"])


def _last_linear(model):
    """Name of the classifier of a torchvision model: its last nn.Linear."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError("--model: this torchvision model has no linear classifier to replace; "
                        "pick another backbone")
    return names[-1]


def _download_failed(name, err):
    return RunFailure(f"--model {name}: could not download its pretrained weights "
                     f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no network?'}); "
                     "offline, pass a local file with --weights PATH (or --no-pretrained)")


def load_weights_file(path: str) -> dict:
    """A state dict from a .safetensors file or a torch file loaded weights-only."""
    if not os.path.isfile(path):
        raise UserError(f"--weights {path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise UserError(f"--weights {path}: not a readable safetensors file ({e})") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--weights {path}: refused, it is not a plain weights file that loads "
                        f"with weights_only=True (it may contain code: {str(e).splitlines()[0]}); "
                        "use a .safetensors or state-dict file") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--weights {path}: holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(model: nn.Module, state_dict: dict, head_names: tuple, source: str) -> None:
    """Load pretrained tensors; the old heads may differ, any other mismatch is an error."""
    own = model.state_dict()
    in_head = lambda k: in_heads(k, head_names)  # noqa: E731
    mismatched = [k for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape and not in_head(k)]
    missing = [k for k in own if k not in state_dict and not in_head(k)
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        for label, keys in (("shape differs", mismatched), ("missing", missing),
                            ("unexpected", unexpected)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                             f" ({len(keys)})")
        raise UserError(f"--weights {source}: does not fit this architecture ({'; '.join(parts)}); "
                        "pass weights made for this --model")
    model.load_state_dict({k: v for k, v in state_dict.items() if v.shape == own[k].shape},
                          strict=False)


def _hub_offline_if_unreachable():
    """Without network, huggingface_hub retries each file 5 times with backoff (~50 s here)
    before timm gives up. One request first, through huggingface_hub's own HTTP session (so
    its proxy settings, certificates and timeout apply): if the Hub cannot be reached at all,
    offline mode, so a cached model loads and a missing one fails at once."""
    import huggingface_hub.constants as hub
    from huggingface_hub.utils import get_session

    if hub.HF_HUB_OFFLINE:
        return
    try:
        get_session().head(hub.ENDPOINT, timeout=hub.HF_HUB_ETAG_TIMEOUT)
    except Exception as e:  # the HTTP client's transport errors (DNS, refused, timeout, proxy)
        hub.HF_HUB_OFFLINE = True  # read by huggingface_hub.is_offline_mode() at each call
        logger.info(f"{hub.ENDPOINT} is unreachable ({type(e).__name__}): using the local Hugging "
                    "Face cache only")


def _timm_heads(model):
    """Every classifier a timm model reports (distilled models: head and head_dist)."""
    heads = model.pretrained_cfg.get("classifier") or "head"
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return tuple(h for h in heads if _has_module(model, h))


def _has_module(model, name):
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def build_model(name: str, num_classes: int, pretrained: bool = True,
                weights: Optional[str] = None) -> Network:
    """The Network (model, head_names, preprocessing) with new `num_classes` heads."""
    from common.pretrained import ALIASES, BUNDLED, bundled_state_dict

    if name in ALIASES:
        logger.info(f"--model {name}: this project's former name of timm's {ALIASES[name]} "
                    f"(the same network and weights); timm's own {name} is another network, "
                    f"--model timm:{name}")
    library, arch = split_model_name(name)
    if library == "timm":
        import timm

        bundled = arch in BUNDLED and pretrained and weights is None  # installed with pip
        hub = pretrained and weights is None and not bundled
        if hub:
            _hub_offline_if_unreachable()
        try:
            model = timm.create_model(arch, pretrained=hub)
        except OSError as e:  # no network / not in the Hub cache
            raise _download_failed(name, e) from None
        head_names = _timm_heads(model)
        if weights:
            load_into(model, load_weights_file(weights), head_names, weights)
        elif bundled:
            model.load_state_dict(bundled_state_dict(model, name))
        model.reset_classifier(num_classes)  # every head (timm resets head_dist too)
        head_names = _timm_heads(model)
        preprocessing = _preprocessing_timm(model)
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(
                arch, weights="DEFAULT" if pretrained and weights is None else None)
        except (urllib.error.URLError, OSError) as e:
            raise _download_failed(name, e) from None
        head_names = (_last_linear(model),)
        if weights:
            load_into(model, load_weights_file(weights), head_names, weights)
        old = model.get_submodule(head_names[0])
        parent, _, child = head_names[0].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                nn.Linear(old.in_features, num_classes))
        preprocessing = _preprocessing_torchvision(arch)
    return Network(model, head_names, preprocessing)


def freeze_backbone(model: nn.Module, head_names: tuple, frozen: bool = True) -> None:
    """Only the heads' parameters train (frozen=False: all of them again). BatchNorm
    statistics are kept by `set_train_mode`."""
    for name, p in model.named_parameters():
        p.requires_grad_(not frozen or in_heads(name, head_names))


def set_train_mode(model: nn.Module, head_names: tuple, frozen_backbone: bool,
                   bn_eval: bool = False) -> None:
    """model.train(), except that a frozen backbone stays in eval mode: its BatchNorm running
    statistics are not updated and its dropout is off, so it computes exactly the pretrained
    features. `bn_eval` (--bn-eval): every BatchNorm layer stays in eval mode (statistics as
    pretrained) while the weights train."""
    if frozen_backbone and head_names:
        model.eval()
        for h in head_names:
            model.get_submodule(h).train()
    else:
        model.train()
        if bn_eval:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
