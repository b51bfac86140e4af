"""How far the fine-tune defaults' wall time is from their arithmetic: the suite's schedule
at the bare model's speed, against fastai's wall time from the same suite run.

    python benchmarks/compute_bound.py benchmarks/results/suite-speed4-seed0.json

Measures here, in this process, alternately for --rounds rounds (the medians are used): the
bare training step (forward, backward and AdamW step of tf_efficientnet_lite0 on one random
batch of 32 at 224 px, channels-last, fp32, glibc's heap kept as the scripts keep it on CPU)
and the bare evaluation forward (the same model and batch, no_grad). Then, for each set of
the results file (`suite.py --json`, recipes finetune and fastai, one seed): the images the
defaults' run computed on (train images x epochs through the training step; the linear
probe's extraction of train + val, and val x epochs, through the forward), the seconds that
takes at the measured rates, the run's wall time and fastai's (process_seconds: the whole
launch), and two ratios to fastai's: the run's, and the schedule's at the bare rates (no
start-up, loading, evaluation bookkeeping, checkpoints or pictures: the lowest ratio this
schedule can reach on this machine). The rates come from this process, the wall times from
the suite's: run it on the machine (and the same kind of quiet) the suite ran on.
"""

import argparse
import json
import os
import statistics
import sys
import time

import timm
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common.memory import keep_host_memory  # noqa: E402
from machine import describe  # noqa: E402


def rates(rounds: int, steps: int = 8, batch: int = 32) -> tuple[float, float]:
    """(training img/s, evaluation img/s), the medians over `rounds` alternating rounds."""
    keep_host_memory(torch.device("cpu"))
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def train():
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        model.eval()
        model(x)

    for f in (train, forward):  # warm-up
        f()
        f()
    got = {train: [], forward: []}
    for _ in range(rounds):
        for f in got:
            t = time.perf_counter()
            for _ in range(steps):
                f()
            got[f].append(steps * batch / (time.perf_counter() - t))
    return statistics.median(got[train]), statistics.median(got[forward])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a suite.py --json file with finetune and fastai rows")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    train_rate, eval_rate = rates(args.rounds)
    print(f"bare training step {train_rate:.1f} img/s, bare evaluation forward "
          f"{eval_rate:.1f} img/s (medians of {args.rounds} rounds)\n")
    with open(args.results) as fh:
        results = json.load(fh)["results"]
    print(f"{'set':18s} {'epochs':>6s} {'compute s':>9s} {'wall s':>7s} {'share':>6s} "
          f"{'fastai s':>8s} {'ratio':>6s} {'at compute':>10s}")
    totals = [0.0, 0.0, 0.0]
    for name, recipes in results.items():
        ours, fastai = recipes["finetune"][0], recipes["fastai"][0]
        n_train, n_val, epochs = ours["train_samples"], ours["val_samples"], ours["epochs"]
        compute = (n_train * epochs / train_rate
                   + (n_train + n_val + n_val * epochs) / eval_rate)
        wall, theirs = ours["process_seconds"], fastai["process_seconds"]
        for i, v in enumerate((compute, wall, theirs)):
            totals[i] += v
        print(f"{name:18s} {epochs:6d} {compute:9.0f} {wall:7.0f} {compute / wall:6.2f} "
              f"{theirs:8.0f} {wall / theirs:6.2f} {compute / theirs:10.2f}")
    compute, wall, theirs = totals
    print(f"{'total':18s} {'':6s} {compute:9.0f} {wall:7.0f} {compute / wall:6.2f} "
          f"{theirs:8.0f} {wall / theirs:6.2f} {compute / theirs:10.2f}")


if __name__ == "__main__":
    main()
