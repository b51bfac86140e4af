"""Host syncs per training epoch, on whatever device is here: they must not grow with the
number of steps (a sync per step stalls a GPU's queue of kernels).

    python benchmarks/loop_syncs.py

Runs `common.engine.train_epoch` on a small MLP for epochs of 8 and 32 optimiser steps,
no log point inside, plain and with class weights (--class-weights auto) and the EMA
(--model-ema) on, and prints the syncs counted in each. On CUDA the count is CUDA's own
(`torch.cuda.set_sync_debug_mode("warn")`: every synchronising call warns, a blocking copy
of host data to the GPU included); on a CPU, the calls that copy to the host or talk to
other processes, and those that would copy host data to a GPU (as tests/test_loop.py counts
them).
fp32 and bf16 only: fp16's GradScaler reads its overflow flag on the host at every step, which
is inherent to loss scaling.
"""

import os
import sys
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

from machine import describe  # noqa: E402
from common.engine import make_loss  # noqa: E402
from test_loop import _epoch  # noqa: E402


# built anew for every epoch measured: a loss shared between them would build its class
# weights in the first epoch only, and the two counts would differ by that one copy
VARIANTS = {"plain": lambda: {},
            "class weights + EMA": lambda: dict(loss=make_loss(0.0, [0.7, 1.3]),
                                                ema_decay=0.99)}


def cuda_syncs(accelerator, n, **variant):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _epoch(accelerator, n=n, batch_size=4, **variant)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main():
    print(f"machine: {describe()}")
    # as common/accelerator.py builds it: non-blocking copies of pinned batches
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))
    for name, make_variant in VARIANTS.items():
        counts = []
        for steps in (8, 32):
            variant = make_variant()
            if torch.cuda.is_available():
                count = cuda_syncs(accelerator, steps * 4, **variant)
            else:
                import pytest

                with pytest.MonkeyPatch.context() as m:
                    from test_loop import SyncCounter

                    counter = SyncCounter(m, accelerator)
                    _epoch(accelerator, n=steps * 4, batch_size=4, **variant)
                    count = counter.count + counter.copies
            counts.append(count)
            print(f"{name}: {steps:3d} optimiser steps: {count} host syncs "
                  f"({accelerator.device})")
        print(f"{name}: {'OK, constant' if counts[0] == counts[1] else 'GROWS with steps'}")


if __name__ == "__main__":
    main()
