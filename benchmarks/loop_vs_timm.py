"""Our training loop against timm's train.py, alternating, each with two malloc settings.

    python benchmarks/loop_vs_timm.py --timm-train /tmp/timm-train/train.py --rounds 3

One run of either is too noisy on a shared CPU (its speed wanders 20-40% between runs minutes
apart), so this runs four variants in turn, round after round, and prints the median img/s of
each and the medians of ratios taken within a round (which cancel the drift):
- ours as shipped: on CPU the scripts keep freed memory in glibc's heap (mmap off, no
  automatic trim: common.memory.keep_host_memory);
- ours with glibc's defaults: `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` (glibc's default value;
  any glibc.malloc tunable makes the scripts leave malloc alone);
- timm's train.py as it runs by itself (glibc's defaults);
- timm's train.py with the same malloc settings as ours, through glibc's tunables.
Each run: 2 epochs on a subset of --data-dir (--per-class train images per class, 4 val
images per class, symlinks in a temporary folder), fp32, channels-last, batch 32, on the GPU
where there is one, --workers loader workers for both (default: the scripts' own default for
one process, 0 on a CPU, the spare cores beside a GPU); the figure is epoch 2's (ours:
metrics.jsonl; timm: its running mean over the epoch's updates, loading included). timm's
train.py: `git show HEAD:train.py` of a pytorch-image-models clone at the installed timm's
version.
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from loader_vs_model import SHARED, timm_rate, train_rate, train_workers  # noqa: E402
from machine import describe  # noqa: E402

VARIANTS = {  # name: (whose, GLIBC_TUNABLES or None)
    "ours as shipped": ("ours", None),
    "ours, glibc defaults": ("ours", "glibc.malloc.hugetlb=0"),
    "timm as is": ("timm", None),
    "timm, heap kept": ("timm", "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647"),
}
RATIOS = (("ours as shipped", "timm as is"), ("ours, glibc defaults", "timm as is"),
          ("ours as shipped", "timm, heap kept"), ("ours as shipped", "ours, glibc defaults"),
          ("timm, heap kept", "timm as is"))


def subset(src, dst, per_class, val_per_class=4):
    """A train/ + val/ folder of symlinks: the first images of every class, sorted."""
    for split, n in (("train", per_class), ("val", val_per_class)):
        for cls in sorted(os.listdir(os.path.join(src, split))):
            os.makedirs(os.path.join(dst, split, cls))
            for f in sorted(os.listdir(os.path.join(src, split, cls)))[:n]:
                os.symlink(os.path.join(src, split, cls, f), os.path.join(dst, split, cls, f))
    return len(os.listdir(os.path.join(dst, "train")))


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm-train", required=True, help="timm's train.py")
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data", "clothing"))
    p.add_argument("--per-class", type=int, default=32, help="train images per class")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=-1,
                   help="loader workers of both loops (-1: the scripts' default here)")
    args = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    rates = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        num_classes = subset(args.data_dir, os.path.join(tmp, "data"), args.per_class)
        run_args = argparse.Namespace(data_dir=os.path.join(tmp, "data"), model=args.model,
                                      batch_size=args.batch_size, train_workers=args.workers,
                                      timm_train=args.timm_train)
        workers = train_workers(run_args)
        for r in range(args.rounds):
            for name, (whose, tunables) in VARIANTS.items():
                os.environ.pop("GLIBC_TUNABLES", None)
                if tunables:
                    os.environ["GLIBC_TUNABLES"] = tunables
                rates[name].append(train_rate(run_args) if whose == "ours"
                                   else timm_rate(run_args, num_classes))
            os.environ.pop("GLIBC_TUNABLES", None)
            print(f"round {r + 1}: " + ", ".join(f"{name} {v[-1]:.1f}"
                                                 for name, v in rates.items()) + " img/s",
                  flush=True)
    print(f"\n{args.model}, batch {args.batch_size}, {args.per_class * num_classes} train "
          f"images, fp32 channels-last, {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{workers} workers, epoch 2, {args.rounds} rounds")
    for name, v in rates.items():
        print(f"{name:22s} median {statistics.median(v):6.1f} img/s  (min {min(v):.1f}, "
              f"max {max(v):.1f})")
    for a, b in RATIOS:
        ratios = [x / y for x, y in zip(rates[a], rates[b])]
        print(f"{a} / {b}: median {statistics.median(ratios):.2f}x  (min {min(ratios):.2f}, "
              f"max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
