"""Decoding an image file into an upright RGB picture, and transforming it under a seed of its
own: the one path for training, feature extraction, streaming and predict.py."""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Optional, TYPE_CHECKING, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch


if TYPE_CHECKING:  # names for the type hints only
    from common.config import TrainConfig


def decode_image(source: Union[str, dict], min_side: Optional[int] = None) -> PIL.Image.Image:
    """An upright RGB PIL image from a file path or a datasets Image dict ({"path", "bytes"}).

    JPEGs decode at the smallest DCT scale (1/2, 1/4, 1/8: PIL's draft mode) whose shorter
    side is still at least `min_side`: a 4000 x 3000 photo evaluated at a 256-pixel resize
    decodes at 1/8 scale, several times faster, with no loss the resize would keep. EXIF
    orientation is applied (as datasets' Image feature does). The one decode path for
    training, feature extraction, streaming and predict.py."""
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    img = PIL.Image.open(source)
    if min_side and img.format == "JPEG" and min(img.size) > min_side:
        scale = min_side / min(img.size)
        img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
    PIL.ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when it is upright
    return to_rgb(img)


def decode_sizes(preprocessing: dict, cfg: Optional[TrainConfig] = None) -> tuple[int, int]:
    """(training, evaluation) smallest shorter side to decode at. Evaluation resizes to
    `resize`; a training crop covers at least --train-crop-scale of the image's area, so a
    shorter side of input_size / sqrt(scale) keeps every crop at full resolution."""
    scale = cfg.train_crop_scale if cfg is not None else 0.08
    return math.ceil(preprocessing["input_size"] / math.sqrt(scale)), preprocessing["resize"]


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB from any mode: grayscale, palette, RGBA, CMYK (PIL's conversions), and 16/32-bit
    integer or float images, which PIL's convert("RGB") clips to white: rescaled to 8 bits.
    An RGB image is returned as it is (convert would copy it)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = PIL.Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def seeded(transform: Callable, img: Any, seed: int) -> torch.Tensor:
    """transform(img) under the CPU RNG seeded with `seed`, the RNG's state put back after
    (what torch.random.fork_rng(devices=[]) does, but without torch.manual_seed, which also
    reseeds every GPU's generator: 50x the cost per image, and a side effect)."""
    rng = torch.default_generator
    state = rng.get_state()
    rng.manual_seed(seed)
    try:
        return transform(img)
    finally:
        rng.set_state(state)
