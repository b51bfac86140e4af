"""CPU time per image of the data path: decode, then the eval and training transforms, with
the resizes on PIL images (the order before 2026-12-07) or on uint8 tensors (as shipped).

    python benchmarks/decode_cost.py [--images 150] [--sets clothing,hotdog]

Per set of ../shared/data (its first --images val images, read into memory first, so the
disk is not timed): `common.images.decode_image` at the evaluation's draft size, then each
transform on the decoded pictures, in this process with torch's default threads (as the
scripts' loaders run with 0 workers on CPU). The training transform is timed unseeded (the
per-sample seeding is the same in both orders). Prints milliseconds per image.
"""

import argparse
import glob
import os
import sys
import time

import torch
from torchvision.transforms import v2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common.data import build_transforms  # noqa: E402
from common.images import decode_image  # noqa: E402
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(HERE, "..", "..", "shared"))
SETS = ("hymenoptera_data", "clothing", "rice_leaf", "brain_mri", "hotdog")
PRE = dict(input_size=224, resize=256, interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3)


def pil_order(p):
    """The transforms as they were: resizes on the PIL image, the tensor made last."""
    interp = v2.InterpolationMode(p["interpolation"])
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=p["mean"], std=p["std"])]
    train = v2.Compose([v2.RandomResizedCrop(p["input_size"], scale=(0.08, 1.0),
                                             interpolation=interp, antialias=True),
                        v2.RandomHorizontalFlip(), *tail])
    evaluation = v2.Compose([v2.Resize(p["resize"], interpolation=interp, antialias=True),
                             v2.CenterCrop(p["input_size"]), *tail])
    return train, evaluation


def per_image_ms(fn, items):
    fn(items[0])  # first call: lazy set-up
    t = time.perf_counter()
    for x in items:
        fn(x)
    return (time.perf_counter() - t) / len(items) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--sets", default=",".join(SETS))
    args = parser.parse_args()
    print(f"machine: {describe()}")
    old_train, old_eval = pil_order(PRE)
    new_train, new_eval = build_transforms(PRE)
    print(f"{'set':18s} {'decode':>7s} {'eval PIL':>9s} {'eval u8':>8s} {'train PIL':>10s} "
          f"{'train u8':>9s}  (ms per image)")
    for name in args.sets.split(","):
        files = sorted(glob.glob(os.path.join(SHARED, "data", name, "val", "*", "*")))
        blobs = [open(f, "rb").read() for f in files[:args.images]]
        decode = per_image_ms(lambda b: decode_image({"bytes": b}, PRE["resize"]), blobs)
        pictures = [decode_image({"bytes": b}, PRE["resize"]) for b in blobs]
        kinds = (old_eval, new_eval, old_train, new_train)
        times = [per_image_ms(tf, pictures) for tf in kinds]
        print(f"{name:18s} {decode:7.2f} " + " ".join(
            f"{t:{w}.2f}" for t, w in zip(times, (9, 8, 10, 9))))


if __name__ == "__main__":
    main()
