"""Host memory on the CPU (glibc): reuse freed heap pages while training, hand them back while
evaluating."""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING


if TYPE_CHECKING:  # names for the type hints only
    import torch

_MALLOC_TRIM = None
# glibc's mallopt parameters (malloc.h) and the environment that sets them by hand
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TOP_PAD_")


def keep_host_memory(device: torch.device) -> bool:
    """On CPU (glibc), keep freed memory in the process for the next training step.

    By default glibc serves every large allocation (a batch's activations: 50+ MB each at
    batch 32) with its own mmap and unmaps it when freed, so every step faults in and the
    kernel zeroes gigabytes of fresh pages again: ~800k page faults per step of
    EfficientNet-Lite0 at batch 32, about half of the step's time on a 2-core CPU. With
    mmap off and no automatic trim, the next step reuses the same heap: the bare step ran
    1.9x faster, at +11% peak RSS (benchmarks/README.md, speed). Evaluation still hands the
    pages back before each val batch (trim_host_memory), so memory between epochs stays
    bounded. Left alone where the user tuned malloc (MALLOC_*_ or glibc.malloc.* in
    GLIBC_TUNABLES) or the allocator is not glibc's."""
    if device.type != "cpu" or any(k in os.environ for k in _USER_MALLOC_ENV) or \
            "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    # the trim threshold is an int: 2 GiB of free heap top before glibc trims on its own
    return bool(mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def trim_host_memory(device: torch.device) -> None:
    """On CPU, hand freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere).
    A CPU forward pass at batch 32 allocates and frees hundreds of MB of activations; glibc
    keeps freed pages mapped and, fragmented by the decoded images in between, the resident
    memory creeps up with every batch (without this the peak grew by ~160 MB from 7 to 63 val
    batches; with it by ~16 MB). Called before each evaluation and extraction batch, it costs
    about 1-2% of a batch (benchmarks/README.md, memory)."""
    global _MALLOC_TRIM
    if device.type != "cpu":
        return
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
