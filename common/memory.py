"""Host memory on the CPU (glibc): reuse freed heap pages, and hand them back when an
evaluation or extraction pass has grown by more than a margin."""

from __future__ import annotations

import ctypes
import os
from typing import Optional, TYPE_CHECKING


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
    1.9x faster, at +11% peak RSS (benchmarks/README.md, speed). Evaluation and extraction
    hand pages back when their memory creeps up (HeapGuard). Left alone where the user
    tuned malloc (MALLOC_*_ or glibc.malloc.* in GLIBC_TUNABLES) or the allocator is not
    glibc's."""
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
    """On CPU, hand freed heap pages back to the OS now (glibc's malloc_trim; a no-op
    elsewhere). See HeapGuard for when evaluation and extraction do it."""
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


def _anon_resident_bytes() -> Optional[int]:
    """This process's resident anonymous memory (the heap and tensors, not mapped files),
    from /proc; None where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None


class HeapGuard:
    """Bounds the resident memory of a CPU evaluation or extraction pass: call it before each
    batch. A forward pass at batch 32 allocates and frees hundreds of MB of activations, and
    glibc (kept from unmapping them by keep_host_memory) reuses those pages for the next
    batch; but the decoded images in between fragment the heap, so resident memory creeps up
    batch after batch (+478 MB from 63 to 625 val batches without a trim). Handing the pages
    back before every batch bounds that, but every batch then faults its activations in
    again, which halved the evaluation's speed (41 against 82 img/s on a 2-core CPU). So the
    pages go back only when the anonymous resident memory has grown more than `margin_mb`
    above its level after the pass's first two batches (or the two batches after the last
    hand-back: the second batch still settles the heap's layout, faulting in 40-80 MB of
    new pages in a steady loop of 200 MB a batch): a few times in hundreds of batches
    (benchmarks/README.md, issue 33). A no-op off the CPU; without /proc it trims before
    every batch from the third."""

    def __init__(self, device: torch.device, margin_mb: int = 128):
        self.device, self.margin = device, margin_mb << 20
        self.level: Optional[int] = None  # after two batches since the start or a trim
        self.calls = 0  # since the start, or since (and with) the call that trimmed
        self.trims = 0

    def __call__(self) -> None:
        if self.device.type != "cpu":
            return
        self.calls += 1
        if self.calls <= 2:  # before the first two batches: the heap is still settling
            return
        now = _anon_resident_bytes()
        if now is None:
            trim_host_memory(self.device)
            self.trims += 1
        elif self.level is None:
            self.level = now
        elif now > self.level + self.margin:
            trim_host_memory(self.device)
            self.level, self.calls, self.trims = None, 1, self.trims + 1
