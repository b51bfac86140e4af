"""Extraction against the bare backbone: is `train_extractor.py` at the backbone's speed?

    python benchmarks/extract_speed.py [--data ../shared/data/clothing] [--batches 20]

In one run, on whatever device is here: (1) the bare backbone's forward up to the features
(`forward_features` + pooling, no head, no data: random batches of 32 at 224 px,
channels-last, glibc's heap kept as the scripts keep it on CPU) in fp32, and under bf16 autocast where `--extract-precision auto` picks bf16;
(2) `train_extractor.py --epochs 0` on the image folder with its defaults and a cold feature
cache (decode from disk, resize, forward, write the cache), its `extract_images_per_second`
from results.json. Prints both and the ratio of (2) to the best native precision of (1).
"""

import argparse
import json
import os
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
from common.memory import keep_host_memory  # noqa: E402
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))


def bare_forward(device, dtype, batches, batch_size=32):
    keep_host_memory(device)  # as the scripts do on CPU: freed activations stay in the heap
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(SHARED, "data", "clothing"))
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bare = {"fp32": bare_forward(device, "fp32", args.batches)}
    # the extractor's own rule for --extract-precision auto: bf16 where the device has it
    if extract_precision(ExtractorConfig(), device) == "bf16":
        bare["bf16"] = bare_forward(device, "bf16", args.batches)
    for k, v in bare.items():
        print(f"bare backbone forward, {k}: {v:.1f} img/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
               "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml")
               if device.type == "cpu" else os.path.join(REPO, "accelerate_configs",
                                                         "single_gpu.yaml"),
               os.path.join(REPO, "train_extractor.py"), "--data-dir", args.data,
               "--epochs", "0", "--output-dir", os.path.join(tmp, "run"),
               "--feature-cache-dir", os.path.join(tmp, "cache"), "--report-to", "none"]
        subprocess.run(cmd, check=True, capture_output=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
        res = json.load(open(os.path.join(tmp, "run", "results.json")))
    rate = res["extract_images_per_second"]
    best = max(bare, key=bare.get)
    print(f"train_extractor.py extraction ({res['extract_precision']}, decode included): "
          f"{rate:.1f} img/s")
    print(f"ratio extraction / bare {best}: {rate / bare[best]:.2f}")


if __name__ == "__main__":
    main()
