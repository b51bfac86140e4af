"""What handing freed heap pages back costs a CPU evaluation (common.memory).

    python benchmarks/trim_cost.py [--batches 6] [--rounds 4]

Times the eval forward pass of the default backbone (`tf_efficientnet_lite0`, random init,
batch 32 at 224 px) in one process with glibc's heap kept as the scripts keep it on CPU
(`keep_host_memory`), in alternating blocks (so a second job on the machine slows all alike):
no hand-back, `malloc_trim` before every batch (the scripts before HeapGuard), and
`HeapGuard` (what evaluation and extraction do: a hand-back only when the memory creeps up).
Prints the medians and their ratios to the first. The memory each saves is measured by the
peak-RSS runs in README.md.
"""

import argparse
import os
import statistics
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.memory import HeapGuard, keep_host_memory, trim_host_memory  # noqa: E402
from machine import describe  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=6, help="batches per block")
    parser.add_argument("--rounds", type=int, default=4, help="blocks of each kind")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    cpu = torch.device("cpu")
    print(f"heap kept: {keep_host_memory(cpu)}")
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    xs = [torch.randn(32, 3, 224, 224) for _ in range(2)]
    seconds = {"none": [], "every batch": [], "HeapGuard": []}
    with torch.inference_mode():
        model(xs[0])  # warm-up
        for _ in range(args.rounds):
            for mode in seconds:
                guard = HeapGuard(cpu)  # one per block, as one per evaluation
                for i in range(args.batches):
                    t = time.perf_counter()
                    if mode == "every batch":
                        trim_host_memory(cpu)
                    elif mode == "HeapGuard":
                        guard()
                    model(xs[i % 2]).float()
                    seconds[mode].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    for k, v in med.items():
        print(f"{k:12s} median {v:.3f} s/batch over {len(seconds[k])} batches, "
              f"{v / med['none']:.2f}x of none")


if __name__ == "__main__":
    main()
