"""One training step, ours against timm train.py's, in one process, alternating blocks.

    python benchmarks/step_vs_timm.py [--blocks 3 --steps 3]

Same model (timm's tf_efficientnet_lite0, 10 classes, random init), batch 32 at 224 px,
channels-last, fp32, random inputs already in memory: only the step differs. Variants:
A the bare step of loader_vs_model.py (cross-entropy, torch SGD lr 1e-3, no momentum);
B A's loss with timm's create_optimizer_v2 (SGD, nesterov, momentum 0.9, wd 2e-5 off norms);
C timm's LabelSmoothingCrossEntropy(0.1) with A's optimiser; D A's loss with our
build_optimizer (the fine-tune defaults' groups); E A's loss, torch SGD lr 0.01 momentum 0.9.
Prints img/s per block and the median per variant. Per-step noise on a shared 2-core VM is
about +-10%: compare medians of several blocks, on a quiet machine.
"""

import argparse
import os
import sys
import time

import timm
import torch
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import FinetuneConfig  # noqa: E402
from common.optim import build_optimizer  # noqa: E402


def main():
    from machine import describe

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    torch.manual_seed(0)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,))
    ce, lsce = torch.nn.functional.cross_entropy, LabelSmoothingCrossEntropy(0.1)
    variants = {
        "A ce / torch SGD lr 1e-3": (ce, lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)),
        "B ce / timm create_optimizer_v2": (ce, lambda m: create_optimizer_v2(
            m, "sgd", lr=0.01, weight_decay=2e-5, momentum=0.9)),
        "C timm LSCE / torch SGD lr 1e-3": (lsce, lambda m: torch.optim.SGD(m.parameters(),
                                                                            lr=1e-3)),
        "D ce / our build_optimizer": (ce, lambda m: build_optimizer(FinetuneConfig(), m,
                                                                     ("classifier",))),
        "E ce / torch SGD lr 0.01 mom 0.9": (ce, lambda m: torch.optim.SGD(
            m.parameters(), lr=0.01, momentum=0.9)),
    }
    built = {}
    for name, (loss_fn, make_opt) in variants.items():
        model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
        model = model.to(memory_format=torch.channels_last).train()
        built[name] = (model, make_opt(model), loss_fn)
    rates = {name: [] for name in variants}
    for block in range(args.blocks):
        for name, (model, opt, loss_fn) in built.items():
            for i in range(args.steps + 1):
                if i == 1:
                    t0 = time.time()  # the first step of each block warms up
                loss_fn(model(x), y).backward()
                opt.step()
                opt.zero_grad()
            rates[name].append(args.steps * 32 / (time.time() - t0))
            print(f"block {block} {name:34s} {rates[name][-1]:6.1f} img/s", flush=True)
    for name, r in rates.items():
        print(f"{name:34s} median {sorted(r)[len(r) // 2]:6.1f} img/s")


if __name__ == "__main__":
    main()
