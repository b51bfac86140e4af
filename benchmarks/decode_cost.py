"""CPU time per image of the data path: decode, then the eval and training transforms, with
the resizes on PIL images (as shipped) or on uint8 tensors (tried on 2026-12-07 and taken
back: benchmarks/README.md, issue 33), and a batch of the eval path one image at a time
against ImageDataset.__getitems__ + its collate (decode and transform on threads, as the
loaders do).

    python benchmarks/decode_cost.py [--images 150] [--sets clothing,hotdog]

Per set of ../shared/data (its first --images val images, read into memory first, so the
disk is not timed): `common.images.decode_image` at the evaluation's draft size, then each
transform on the decoded pictures, in this process with torch's default threads (as the
scripts' loaders run with 0 workers on CPU). The training transform is timed unseeded (the
per-sample seeding is the same in both orders). Then decode + eval transform per image:
`ImageDataset[i]` one by one ("item") against batches of 32 through `__getitems__` and
the loaders' collate (channels-last, converted and normalised per batch: "batch"). Prints
milliseconds per image.
"""

import argparse
import glob
import os
import sys
import time

import datasets
import torch
from torchvision.transforms import v2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common.data import ImageDataset, build_transforms  # noqa: E402
from common.images import decode_image  # noqa: E402
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(HERE, "..", "..", "shared"))
SETS = ("hymenoptera_data", "clothing", "rice_leaf", "brain_mri", "hotdog")
PRE = dict(input_size=224, resize=256, interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3)


def uint8_order(p):
    """The transforms with the tensor made first: resizes on uint8 tensors."""
    interp = v2.InterpolationMode(p["interpolation"])
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=p["mean"], std=p["std"])]
    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(p["input_size"], scale=(0.08, 1.0),
                                                           interpolation=interp, antialias=True),
                        v2.RandomHorizontalFlip(), *tail])
    evaluation = v2.Compose([v2.ToImage(),
                             v2.Resize(p["resize"], interpolation=interp, antialias=True),
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
    pil_train, pil_eval = build_transforms(PRE)
    u8_train, u8_eval = uint8_order(PRE)
    print(f"{'set':18s} {'decode':>7s} {'eval PIL':>9s} {'eval u8':>8s} {'train PIL':>10s} "
          f"{'train u8':>9s} {'item':>6s} {'batch':>6s}  (ms per image)")
    for name in args.sets.split(","):
        files = sorted(glob.glob(os.path.join(SHARED, "data", name, "val", "*", "*")))
        blobs = [open(f, "rb").read() for f in files[:args.images]]
        decode = per_image_ms(lambda b: decode_image({"bytes": b}, PRE["resize"]), blobs)
        pictures = [decode_image({"bytes": b}, PRE["resize"]) for b in blobs]
        kinds = (pil_eval, u8_eval, pil_train, u8_train)
        times = [per_image_ms(tf, pictures) for tf in kinds]
        split = datasets.Dataset.from_dict(
            {"image": [{"bytes": b, "path": None} for b in blobs], "label": [0] * len(blobs)},
            features=datasets.Features({"image": datasets.Image(decode=False),
                                        "label": datasets.Value("int64")}))
        ds = ImageDataset(split, pil_eval, min_side=PRE["resize"])
        times.append(per_image_ms(ds.__getitem__, range(len(ds))))
        batches = [list(range(i, min(i + 32, len(ds)))) for i in range(0, len(ds), 32)]
        collate = ds.collate(channels_last=True)  # as the loaders batch them
        times.append(per_image_ms(lambda b: collate(ds.__getitems__(b)), batches)
                     * len(batches) / len(ds))
        print(f"{name:18s} {decode:7.2f} " + " ".join(
            f"{t:{w}.2f}" for t, w in zip(times, (9, 8, 10, 9, 6, 6))))


if __name__ == "__main__":
    main()
