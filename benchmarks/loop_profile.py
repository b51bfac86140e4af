"""Where does a training step's time go inside train_finetune.py, against the bare step?

Runs `train_finetune.py` in this process (no pretrained weights, no probe, 0 loader workers,
1 process, --max-train-steps N) with `common.engine.train_step` wrapped in a timer, so each
step splits into: the time since the last step (loading the batch on this process, plus the
loop's own work: metric sums, logging) and the step itself (forward, loss, backward,
optimiser), with the minor page faults the step took. Then, in the same process, the bare step (timm model, random channels-last batch,
cross-entropy, our build_optimizer: benchmarks/step_vs_timm.py's variant D) for as many
steps. With --ops, torch.profiler's top operators over steps 6.. of both, side by side.

    python benchmarks/loop_profile.py --data-dir ../shared/data/clothing --steps 16 --ops
"""

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common.engine as engine  # noqa: E402
import train_finetune  # noqa: E402
from common.config import FinetuneConfig  # noqa: E402
from common.optim import build_optimizer  # noqa: E402

WARM = 5  # steps left out of every median: oneDNN primitives and the allocator warm up


def _faults():
    """Minor page faults of this process so far: fresh pages the allocator asked the OS for."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _ops_table(prof, n=12):
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def loop_steps(args):
    """Per step of the real loop: (seconds since the last step, seconds of the step, its minor
    page faults), and the profiler of steps WARM+1.. (with --ops)."""
    rows, prof = [], None
    orig = engine.train_step
    last_end = [None]

    def timed(*step_args, **step_kwargs):  # not *args: that would hide the script's args
        nonlocal prof
        t0, f0 = time.perf_counter(), _faults()
        if args.ops and len(rows) == WARM:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        out = orig(*step_args, **step_kwargs)
        t1 = time.perf_counter()
        # the time since the last step ended: the batch's loading plus the loop's own work
        rows.append((t0 - last_end[0] if last_end[0] else float("nan"), t1 - t0,
                     _faults() - f0))
        last_end[0] = t1
        if prof is not None and len(rows) == args.steps:
            prof.__exit__(None, None, None)  # the steps only, not the evaluation after them
        return out

    engine.train_step = timed
    try:
        with tempfile.TemporaryDirectory() as out:
            train_finetune.main([
                "--data-dir", args.data_dir, "--model", args.model, "--no-pretrained",
                "--probe-epochs", "0", "--epochs", "1", "--max-train-steps", str(args.steps),
                "--num-workers", "0", "--checkpointing-steps", "no", "--report-to", "none",
                "--output-dir", os.path.join(out, "run")])
    finally:
        engine.train_step = orig
    return rows, prof


def bare_steps(args, num_classes):
    model = timm.create_model(args.model.split(":", 1)[-1], num_classes=num_classes)
    model = model.to(memory_format=torch.channels_last).train()
    opt = build_optimizer(FinetuneConfig(), model, ("classifier",))
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (32,))
    times, faults, prof = [], [], None
    for i in range(args.steps):
        if args.ops and i == WARM:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        t0, f0 = time.perf_counter(), _faults()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
    if prof is not None:
        prof.__exit__(None, None, None)
    return times, faults, prof


def main():
    from machine import describe

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--ops", action="store_true", help="torch.profiler's top operators")
    args = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    num_classes = len(os.listdir(os.path.join(args.data_dir, "train")))
    rows, loop_prof = loop_steps(args)
    bare, bare_faults, bare_prof = bare_steps(args, num_classes)
    med = lambda v: statistics.median(v[WARM:])  # noqa: E731
    wait, step = med([r[0] for r in rows]), med([r[1] for r in rows])
    print(f"steps {len(rows)} (median over steps {WARM + 1}..)")
    print(f"loop: batch wait + loop work {wait:.3f} s, train_step {step:.3f} s, "
          f"together {32 / (wait + step):.1f} img/s")
    print(f"bare step (random batch, same model and optimiser): {med(bare):.3f} s, "
          f"{32 / med(bare):.1f} img/s")
    print(f"minor page faults per step: train_step {med([r[2] for r in rows]):.0f}, "
          f"bare step {med(bare_faults):.0f}")
    print(f"ratios: train_step / bare {step / med(bare):.2f}; "
          f"loop / bare {(wait + step) / med(bare):.2f}")
    if args.ops:
        print("\n== train_step in the loop ==\n" + _ops_table(loop_prof))
        print("\n== bare step ==\n" + _ops_table(bare_prof))


if __name__ == "__main__":
    main()
