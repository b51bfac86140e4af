"""The side a run trains, evaluates and exports at (--image-size auto): the model's input size,
unless the data's images are much smaller than it (the fine-tune).

Upscaling a 32-pixel image to 224 pixels adds no detail and costs (224/32)^2 = 49 times the
pixels of every forward and backward pass. BiT's HyperRule (Kolesnikov et al., 2020) trains
images under 96 pixels at 128. Here: when the median shorter side of the training images is
at most half the model's input size, the side is twice that median, at least MIN_SIDE, a
multiple of 32, never above the input size; else the input size. A model built for a fixed
input size (a ViT's position embeddings) keeps it. The chosen side replaces the input size in
the preprocessing (the resize keeps its ratio to the crop), so the probe's features, every
evaluation, best/'s model.json, its model card, predict.py and the exports all use it.

The extractor keeps the input size: it computes each image's features once, so the side
costs little there, and the frozen features are best at the size they were trained at
(cifar10: the probe's head 0.758 at 224 px, 0.700 at 128; benchmarks/README.md).
"""

from __future__ import annotations

import io
import math
import statistics
from typing import Any, Optional, Union

import PIL.Image

SAMPLE = 256    # images whose headers are read, spread over the split
MIN_SIDE = 128  # BiT's side for images under 96 pixels


def _sides(source: dict) -> Optional[tuple]:
    """(width, height) from an image's header (datasets Image dict), or None."""
    try:
        with PIL.Image.open(io.BytesIO(source["bytes"]) if source.get("bytes")
                            else source["path"]) as img:
            return img.size
    except Exception:  # an unreadable file: the image check reports it
        return None


def median_short_side(split: Any) -> Optional[float]:
    """The median shorter side of up to SAMPLE training images (headers only): rows spread
    over a datasets.Dataset, the first ones of a stream (common/streaming.StreamSplit's
    head: before its shuffle, whose buffer would read thousands of rows first)."""
    import itertools

    import datasets

    if isinstance(split, datasets.Dataset):
        raw = split.cast_column("image", datasets.Image(decode=False))
        rows = range(0, len(raw), max(1, len(raw) // SAMPLE))
        sources = [raw[i]["image"] for i in rows][:SAMPLE]
    else:
        sources = [row["image"] for row in itertools.islice(iter(split.head), SAMPLE)]
    sizes = [s for s in map(_sides, sources) if s]
    return statistics.median(min(s) for s in sizes) if sizes else None


def choose_image_size(requested: Union[int, str], input_size: int, fixed: bool,
                      median: Optional[float], shrink: bool = True) -> tuple[int, str]:
    """(side, why): --image-size N as asked, or auto's rule (module docstring); `shrink`
    False (the extractor) keeps the input size."""
    if requested != "auto":
        return int(requested), f"--image-size {requested}"
    if not shrink:
        return input_size, "the model's input size, where its frozen features are best"
    if fixed:
        return input_size, "the model's fixed input size"
    if median is None or 2 * median > input_size:
        return input_size, "the model's input size"
    side = min(input_size, max(MIN_SIDE, 32 * math.ceil(2 * median / 32)))
    return side, (f"the training images' median side is {median:g} px: trained at twice "
                  f"that (at least {MIN_SIDE}), not upscaled to the model's {input_size}")


def at_image_size(preprocessing: dict, side: int) -> dict:
    """The preprocessing at `side`: the crop, and the resize in the same ratio to it."""
    ratio = preprocessing["resize"] / preprocessing["input_size"]
    return dict(preprocessing, input_size=side, resize=int(math.floor(side * ratio)))


def fixed_input_size(model: Any) -> bool:
    """Whether `model` only takes its own input size (timm's pretrained config says so; of
    torchvision's, its ViTs and MaxViT)."""
    config = getattr(model, "pretrained_cfg", None)
    if config is not None:
        return bool(config.get("fixed_input_size", False))
    return type(model).__name__ in ("VisionTransformer", "MaxVit")


def set_image_size(cfg: Any, network: Any, train: Any) -> str:
    """Put the run's side into `network.preprocessing` (common.models.Network); returns the
    reason, for the run's first lines."""
    input_size = network.preprocessing["input_size"]
    fixed, shrink = fixed_input_size(network.model), cfg.script == "finetune"
    median = median_short_side(train) \
        if cfg.image_size == "auto" and shrink and not fixed else None
    side, why = choose_image_size(cfg.image_size, input_size, fixed, median, shrink)
    network.preprocessing = at_image_size(network.preprocessing, side)
    return f"images at {side} px ({why})"
