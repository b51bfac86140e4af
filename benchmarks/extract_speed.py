"""Extraction against the bare backbone: is `train_extractor.py` at the backbone's speed?

    python benchmarks/extract_speed.py [--data ../shared/data/clothing] [--batches 20] [--rounds 3]

On whatever device is here, --rounds times in turn (a shared CPU's speed wanders by 20-30%
within minutes, so each round's ratio is taken between neighbours, and the median printed):
(1) the bare backbone's forward up to the features (timm's model as it is:
`forward_features` + pooling, no head, no data: random batches of 32 at 224 px,
channels-last, glibc's heap kept as the scripts keep it on CPU) in fp32, and under bf16
autocast where `--extract-precision auto` picks bf16, there also with its BatchNorm layers
folded into the convolutions (common/folding.py, as the extractor runs a bf16 forward);
(2) `train_extractor.py --epochs 0` on the image folder with its defaults and a cold feature
cache (decode from disk, resize, forward, write the cache), its `extract_images_per_second`
from results.json; (3) the bare forwards of the best precision again. Prints them and the
ratio of (2) to the mean of (1) and (3) at the best native precision (the mean of the
forward before and after: the machine's speed drifts within a round too): to timm's forward
(the reference), and where the extractor folds, to the folded forward (what the rest of the
extraction costs beside the forward it runs).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from common.config import ExtractorConfig  # noqa: E402
from common.features import extract_precision  # noqa: E402
from common.folding import fold_batchnorm  # noqa: E402
from common.memory import keep_host_memory  # noqa: E402
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))


def bare_forward(device, dtype, batches, batch_size=32, folded=False):
    keep_host_memory(device)  # as the scripts do on CPU: freed activations stay in the heap
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last)
    if folded:
        model = fold_batchnorm(model, x[:1])
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=dtype == "bf16"):
        for _ in range(3):  # warm-up
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(batches):
            model(x).float()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - t)


def extraction(device, data):
    """train_extractor.py --epochs 0 with a cold cache: (its extract_images_per_second, its
    extract_precision)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
               "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml")
               if device.type == "cpu" else os.path.join(REPO, "accelerate_configs",
                                                         "single_gpu.yaml"),
               os.path.join(REPO, "train_extractor.py"), "--data-dir", data,
               "--epochs", "0", "--output-dir", os.path.join(tmp, "run"),
               "--feature-cache-dir", os.path.join(tmp, "cache"), "--report-to", "none"]
        subprocess.run(cmd, check=True, capture_output=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
        res = json.load(open(os.path.join(tmp, "run", "results.json")))
    return res["extract_images_per_second"], res["extract_precision"]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(SHARED, "data", "clothing"))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the extractor's own rule for --extract-precision auto: bf16 where the device has it
    precisions = ["fp32"] + (["bf16"] if extract_precision(ExtractorConfig(), device) == "bf16"
                             else [])
    ratios, to_folded = [], []
    for r in range(args.rounds):
        before = {k: bare_forward(device, k, args.batches) for k in precisions}
        best = max(before, key=before.get)
        fold = best == "bf16"  # the extractor folds its bf16 forward only
        folded_before = bare_forward(device, best, args.batches, folded=True) if fold else None
        rate, precision = extraction(device, args.data)
        # the best precision's forwards again: the reference is the mean of the forward just
        # before and just after the extraction, so a drift in the machine's speed during
        # the round weighs on both sides of the ratio
        after = bare_forward(device, best, args.batches)
        ratios.append(rate / ((before[best] + after) / 2))
        line = (f"round {r + 1}: bare backbone forward "
                + ", ".join(f"{k} {v:.1f}" for k, v in before.items())
                + (f", {best} folded {folded_before:.1f}" if fold else "")
                + f" img/s; train_extractor.py extraction ({precision}, decode included) "
                f"{rate:.1f} img/s; {best} after it {after:.1f}")
        if fold:
            folded_after = bare_forward(device, best, args.batches, folded=True)
            to_folded.append(rate / ((folded_before + folded_after) / 2))
            line += f", folded {folded_after:.1f}"
        print(f"{line} img/s; ratio to timm's bare {best} (mean of before and after): "
              f"{ratios[-1]:.2f}" + (f", to the folded {to_folded[-1]:.2f}" if fold else ""),
              flush=True)
    print(f"median ratio extraction / bare forward: {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    if to_folded:
        print(f"median ratio extraction / bare folded forward: "
              f"{statistics.median(to_folded):.2f} "
              f"(rounds: {', '.join(f'{x:.2f}' for x in to_folded)})")


if __name__ == "__main__":
    main()
