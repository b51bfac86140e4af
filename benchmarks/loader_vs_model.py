"""Is the model starved? DataLoader throughput (decode + augmentation, as training uses it)
against the bare model's forward+backward throughput, same batch size and precision.

    python benchmarks/loader_vs_model.py --model timm:tf_efficientnet_lite0 --batch-size 32

Prints images/s for the loader with 0..N workers and for the model (fp32, channels-last
as the scripts choose, and bf16 when --bf16). The model is starved when the loader's img/s
at the chosen worker count is below the model's. With --train, it also launches
train_finetune.py (accelerate_configs/single_gpu.yaml where there is a GPU, else cpu.yaml;
its defaults, 2 epochs at this batch size)
and compares the training loop's img/s (epoch 2, from metrics.jsonl) with the bare model's.
With --timm-train PATH/train.py (timm's own training script, e.g. from a clone of
pytorch-image-models at the installed timm's version) it also runs that for 2 epochs on the
same data, model, batch, channels-last, worker count and device, fp32, and prints its
epoch-2 img/s and the ratio:

    python benchmarks/loader_vs_model.py --data-dir ../shared/data/clothing --workers 0 \
        --train --train-workers 0 --timm-train /tmp/timm-train/train.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import FinetuneConfig  # noqa: E402
from common.data import build_dataloaders, default_num_workers, load_image_folder  # noqa: E402
from common.models import build_model  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared"))


def loader_rate(train, val, pre, batch_size, workers, batches=6):
    cfg = FinetuneConfig(batch_size=batch_size, num_workers=workers)
    loader, _ = build_dataloaders(train, val, pre, cfg, num_processes=1)
    it = iter(loader)
    next(it)  # worker start-up is paid once per run, not per batch
    t0, n = time.time(), 0
    for _ in range(batches):
        n += len(next(it)["labels"])
    return n / (time.time() - t0)


def model_rate(model, batch_size, size, channels_last, bf16, steps=4):
    x = torch.randn(batch_size, 3, size, size)
    y = torch.randint(0, 2, (batch_size,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(
            memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for i in range(steps + 1):
        if i == 1:
            t0 = time.time()  # first step warms up allocator and kernels
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * batch_size / (time.time() - t0)


def train_workers(args) -> int:
    """--train-workers, -1 resolved to the scripts' default for one process on this machine
    (0 on a CPU, the spare cores beside a GPU): what both training loops get."""
    return args.train_workers if args.train_workers >= 0 else default_num_workers(1)


def train_rate(args):
    """Images/s of the real training loop: epoch 2 of a 2-epoch fine-tune (epoch 1 pays
    the loader workers' start and the allocator's warm-up), on this machine's GPU where it
    has one (accelerate_configs/single_gpu.yaml), else its CPU (cpu.yaml)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = "single_gpu.yaml" if torch.cuda.is_available() else "cpu.yaml"
    with tempfile.TemporaryDirectory() as out:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
               "--config_file", os.path.join(repo, "accelerate_configs", config),
               os.path.join(repo, "train_finetune.py"), "--data-dir", args.data_dir,
               "--model", args.model, "--no-pretrained", "--batch-size", str(args.batch_size),
               "--epochs", "2", "--freeze-epochs", "0", "--probe-epochs", "0",
               "--checkpointing-steps", "no",
               "--num-workers", str(train_workers(args)),
               "--report-to", "none", "--output-dir", os.path.join(out, "run")]
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ,
                                                                      HF_HUB_OFFLINE="1"))
        with open(os.path.join(out, "run", "metrics.jsonl")) as fh:
            row = [json.loads(line) for line in fh][-1]
    return row["train_samples"] / row["train_seconds"]


def timm_rate(args, num_classes):
    """Images/s of timm's train.py, epoch 2 (its running average over the epoch's updates),
    with the same model, batch, channels-last, workers and fp32 on this device."""
    arch = args.model.split(":", 1)[-1]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, args.timm_train, "--data-dir", args.data_dir,
               "--train-split", "train", "--val-split", "val", "--model", arch,
               "--num-classes", str(num_classes), "-b", str(args.batch_size), "--epochs", "2",
               "--channels-last", "--workers", str(train_workers(args)),
               "--no-prefetcher", "--device", "cuda" if torch.cuda.is_available() else "cpu",
               "--opt", "sgd", "--lr", "0.01", "--sched", "cosine", "--log-interval", "5",
               "--output", out]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode != 0:
            raise SystemExit(f"timm train.py failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "Train: 1 [" in ln]
    # '... Time: 1.1s, 29.1/s  (1.2s, 27.6/s)  ...': the bracket is the epoch's running mean
    return float(lines[-1].split("Time:")[1].split("(")[1].split(",")[1].split("/s")[0])


def main():
    from machine import describe

    print(f"machine: {describe()}", flush=True)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data", "hymenoptera_data"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,1", help="comma-separated worker counts")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    p.add_argument("--train", action="store_true",
                   help="also time the real training loop (fp32, channels-last) against it")
    p.add_argument("--train-workers", type=int, default=-1,
                   help="--num-workers of that training run (-1: the scripts' default)")
    p.add_argument("--timm-train", help="timm's train.py: run it beside ours (needs --train)")
    args = p.parse_args()
    train, val, classes = load_image_folder(args.data_dir, 0.2, 0)
    built = build_model(args.model, len(classes), pretrained=False)
    model, pre = built.model, built.preprocessing
    print(f"{args.model}, batch {args.batch_size}, {pre['input_size']} px, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    for w in map(int, args.workers.split(",")):
        print(f"loader  {w} worker(s): {loader_rate(train, val, pre, args.batch_size, w):7.1f} img/s")
    for cl in (False, True):
        for bf16 in (False, True) if args.bf16 else (False,):
            rate = model_rate(model, args.batch_size, pre["input_size"], cl, bf16)
            print(f"model fwd+bwd {'bf16' if bf16 else 'fp32'}"
                  f"{' channels-last' if cl else '              '}: {rate:7.1f} img/s")
    if args.train:
        bare = rate if not args.bf16 else model_rate(model, args.batch_size,
                                                      pre["input_size"], True, False)
        loop = train_rate(args)
        print(f"training loop fp32 channels-last (train_finetune.py, epoch 2): {loop:7.1f} img/s"
              f" = {loop / bare:.0%} of the bare model's fwd+bwd")
        if args.timm_train:
            theirs = timm_rate(args, len(classes))
            print(f"timm train.py fp32 channels-last (epoch 2): {theirs:7.1f} img/s; "
                  f"ours / timm's: {loop / theirs:.2f}x")


if __name__ == "__main__":
    main()
