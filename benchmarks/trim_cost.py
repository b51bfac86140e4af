"""What `common.memory.trim_host_memory` (glibc malloc_trim before each CPU eval batch) costs.

    python benchmarks/trim_cost.py [--batches 6] [--rounds 4]

Times the eval forward pass of the default backbone (`tf_efficientnet_lite0`, random init,
batch 32 at 224 px) with and without a trim before each batch, in one process, in
alternating blocks (so a second job on the machine slows both alike), and prints the medians
and their ratio. The memory it saves is measured by the peak-RSS runs in README.md.
"""

import argparse
import os
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.memory import trim_host_memory  # noqa: E402
from machine import describe  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=6, help="batches per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks of each kind")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    xs = [torch.randn(32, 3, 224, 224) for _ in range(2)]
    cpu = torch.device("cpu")
    seconds = {"plain": [], "trim": []}
    with torch.inference_mode():
        model(xs[0])  # warm-up
        for _ in range(args.rounds):
            for mode in seconds:
                for i in range(args.batches):
                    t = time.perf_counter()
                    if mode == "trim":
                        trim_host_memory(cpu)
                    model(xs[i % 2]).float()
                    seconds[mode].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    for k, v in med.items():
        print(f"{k:5s} median {v:.3f} s/batch over {len(seconds[k])} batches")
    print(f"ratio trim/plain {med['trim'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
