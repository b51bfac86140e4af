"""Where the extractor's time goes, and how close to the bare forward it can get here.

    python benchmarks/extract_phases.py [--data ../shared/data/clothing] [--rounds 3]

`extract_speed.py` gives the ratio of `train_extractor.py`'s extraction to the bare
backbone's forward; this says what the rest of that time is, in this process, on the CPU
with torch's threads (as the extractor runs there: no loader workers). Per round, in turn:
(1) the bare forward (extract_speed.py's: timm's model on random batches of 32,
channels-last, under bf16 autocast where `--extract-precision auto` picks bf16), and in bf16
the same with the BatchNorm layers folded (common/folding.py); (2) the extractor's batches of
the set as `common.features` builds them (the training split's one augmented view and the val
split's centre view, the same datasets), each batch through the model as the extractor runs
it (folded in bf16), timing apart `__getitems__` (decode and transform on its threads:
"decode"), the loaders' collate and the forward; (3) the decode and transforms alone, image
by image on one thread. Prints milliseconds per image and two ratios to timm's bare forward:
the loop's, and the most that decoding on every core in turn with the extractor's forward
allows, bare / (folded + one-thread decode / threads), with nothing else costing anything.
"""

import argparse
import os
import statistics
import sys
import time

import timm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common.config import ExtractorConfig  # noqa: E402
from common.data import load_image_folder  # noqa: E402
from common.features import extract_precision, feature_datasets  # noqa: E402
from common.folding import fold_batchnorm  # noqa: E402
from common.memory import HeapGuard, keep_host_memory  # noqa: E402
from extract_speed import bare_forward  # noqa: E402
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(HERE, "..", "..", "shared"))
PRE = dict(input_size=224, resize=256, interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3)


def datasets_of(data):
    """The extractor's two image datasets for `data` with its default flags."""
    cfg = ExtractorConfig()
    train, val, _ = load_image_folder(data, cfg.val_fraction, cfg.seed)
    return list(feature_datasets(train, val, PRE, cfg))


@torch.inference_mode()
def loop(model, sets, precision, batch_size=32):
    """Seconds {"decode": __getitems__, "collate", "forward"} over every batch of `sets`,
    and the number of images."""
    guard = HeapGuard(torch.device("cpu"))
    seconds = dict(decode=0.0, collate=0.0, forward=0.0)
    n = 0
    for ds in sets:
        collate = ds.collate(channels_last=True)
        for start in range(0, len(ds), batch_size):
            guard()
            t0 = time.perf_counter()
            samples = ds.__getitems__(list(range(start, min(start + batch_size, len(ds)))))
            t1 = time.perf_counter()
            batch = collate(samples)
            t2 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(batch["pixel_values"]).float()
            t3 = time.perf_counter()
            for k, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2)):
                seconds[k] += dt
            n += len(samples)
    return seconds, n


def one_thread_decode(sets, batch_size=32):
    """Seconds per image to decode and transform every image of `sets` to the uint8 pixels
    that the collate receives (what the decode threads do), on this thread alone: with one
    torch thread, `__getitems__` decodes in the calling thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.perf_counter()
        n = 0
        for ds in sets:
            for start in range(0, len(ds), batch_size):
                n += len(ds.__getitems__(list(range(start, min(start + batch_size, len(ds))))))
        return (time.perf_counter() - t) / n
    finally:
        torch.set_num_threads(threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(SHARED, "data", "clothing"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    device = torch.device("cpu")
    keep_host_memory(device)
    precision = extract_precision(ExtractorConfig(), device)
    sets = datasets_of(args.data)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = model.eval().to(memory_format=torch.channels_last)
    if precision == "bf16":  # as the extractor runs its bf16 forward
        model = fold_batchnorm(model, torch.zeros(1, 3, 224, 224).contiguous(
            memory_format=torch.channels_last))
    threads = torch.get_num_threads()
    loops, bounds = [], []
    for r in range(args.rounds):
        bare_ms = 1e3 / bare_forward(device, precision, batches=20)
        folded_ms = 1e3 / bare_forward(device, precision, batches=20, folded=True) \
            if precision == "bf16" else bare_ms
        seconds, n = loop(model, sets, precision)
        decode_ms = 1e3 * one_thread_decode(sets)
        ms = {k: 1e3 * v / n for k, v in seconds.items()}
        loop_ms = sum(ms.values())
        loops.append(bare_ms / loop_ms)
        bounds.append(bare_ms / (folded_ms + decode_ms / threads))
        print(f"round {r + 1} ({n} images, {precision}, {threads} threads), ms per image: "
              f"bare forward {bare_ms:.2f} (folded {folded_ms:.2f}); the loop {loop_ms:.2f} = "
              + " + ".join(f"{k} {v:.2f}" for k, v in ms.items())
              + f"; decode and transform on one thread {decode_ms:.2f}. Ratio to the bare "
              f"forward: the loop {loops[-1]:.2f}, at most {bounds[-1]:.2f}", flush=True)
    print(f"median ratio: the loop {statistics.median(loops):.2f}, at most "
          f"{statistics.median(bounds):.2f}")


if __name__ == "__main__":
    main()
