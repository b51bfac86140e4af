"""Is the model starved? DataLoader throughput (decode + augmentation, as training uses it)
against the bare model's forward+backward throughput, same batch size and precision.

    python benchmarks/loader_vs_model.py --model timm:tf_efficientnet_lite0 --batch-size 32

Prints images/s for the loader with 0..N workers and for the model (fp32, channels-last
as the scripts choose, and bf16 when --bf16). The model is starved when the loader's img/s
at the chosen worker count is below the model's.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.config import FinetuneConfig  # noqa: E402
from common.data import build_dataloaders, load_image_folder  # noqa: E402
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


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data", "hymenoptera_data"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,1", help="comma-separated worker counts")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    args = p.parse_args()
    train, val, classes = load_image_folder(args.data_dir, 0.2, 0)
    model, _, pre = build_model(args.model, len(classes), pretrained=False)
    print(f"{args.model}, batch {args.batch_size}, {pre['input_size']} px, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    for w in map(int, args.workers.split(",")):
        print(f"loader  {w} worker(s): {loader_rate(train, val, pre, args.batch_size, w):7.1f} img/s")
    for cl in (False, True):
        for bf16 in (False, True) if args.bf16 else (False,):
            rate = model_rate(model, args.batch_size, pre["input_size"], cl, bf16)
            print(f"model fwd+bwd {'bf16' if bf16 else 'fp32'}"
                  f"{' channels-last' if cl else '              '}: {rate:7.1f} img/s")


if __name__ == "__main__":
    main()
