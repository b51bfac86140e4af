"""The Accelerator, the run folder and the seed: what every run sets up first.

CPU multi-process trap (accelerate 1.15/1.16): a launcher config with `use_cpu: true` does
not pass that on to the worker processes of a multi-process launch, so an Accelerator built
without `cpu=True` on a machine without CUDA either fails or believes it is alone. We build
it with `cpu=True` when the launcher asked for the CPU (`ACCELERATE_USE_CPU`, which
`accelerate launch --cpu` and one-process `use_cpu: true` configs set) or CUDA is absent,
and then check that it sees as many processes as the launcher started.
accelerate_configs/cpu_2proc.yaml hides the GPUs from its workers itself (see there).
"""

import ctypes
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DataLoaderConfiguration, broadcast_object_list,
                               parse_flag_from_env, set_seed)

from common.config import save_config
from common.errors import UserError
from common.tracking import resolve_report_to


@dataclass
class Run:
    """What a run knows besides its config: built once by the entry script, read by the loop
    (common/trainer.py, common/engine.py) and by the pictures and run files.

    `trained` is the module the optimiser trains: the whole network, or (extractor on cached
    features) only its heads; `export` is what `best/` holds (the whole network).
    `head_names` are the classifier modules inside `trained` (() when `trained` is the heads
    themselves); everything else in it is the backbone, frozen during `freeze_epochs`.
    """

    script: str                   # "finetune" or "extractor"
    trained: torch.nn.Module
    export: torch.nn.Module
    head_names: tuple
    model_heads: tuple            # the heads' names inside `export`, for model.json
    class_names: list
    preprocessing: dict
    channels_last: bool
    train_images: Any             # decoded image datasets, for the pictures (the loaders
    val_images: Any               # may serve cached features instead)
    loss: Callable                # (logits, labels) -> per-sample training loss
    started: float                # time.time() at the script's first line
    freeze_epochs: Optional[int] = 0  # head-only epochs first; None: the backbone never trains
    extra_results: Optional[dict] = None  # e.g. the feature cache's figures
    mix: Optional[Callable] = None  # --mixup/--cutmix: (x, labels, key) -> (x, soft targets)
    evaluate_start: bool = False  # evaluate the starting model as epoch 0 (after a probe)
    restart_heads: Optional[dict] = None  # --finetune-from random: head tensors to train from
    bn_eval: bool = False         # BatchNorm in eval mode while every layer trains
    tta: bool = False             # evaluate on each image and its mirror image (--tta)

    def frozen_at(self, epoch):
        """Whether the backbone is frozen (parameters and BatchNorm statistics) in `epoch`."""
        return self.freeze_epochs is None or epoch < self.freeze_epochs


def _output_dir(cfg, script, state):
    """The run folder: --output-dir, or outputs/<script>-<time> as the main process reads the
    clock (other ranks may read it a second later)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    chosen = [cfg.output_dir or os.path.join("outputs", f"{script}-{stamp}")]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    return chosen[0]


def launcher_chose_cpu():
    """Whether this run computes on the CPU: the launcher said so (`accelerate launch --cpu`,
    a `use_cpu: true` config, ACCELERATE_USE_CPU=1), or there is no CUDA device."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def gpu_has_native_bf16(device=None):
    """bf16 in hardware: compute capability 8 (Ampere) or newer. torch.cuda.is_bf16_supported()
    also says yes on a T4 or V100 (7.x), where bf16 is emulated and slower than fp16/fp32."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_native_bf16():
    """AMX or AVX512-BF16 (Linux /proc/cpuinfo): without them bf16 autocast is emulated and
    slower than fp32 (measured on an AVX2 EPYC: EfficientNet-Lite0 1.8 vs 5.7 img/s)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_amx():
    """AMX tiles (Intel Sapphire Rapids and newer): bf16 training pays on these CPUs;
    AVX512-BF16 alone speeds up inference, not training."""
    try:
        with open("/proc/cpuinfo") as fh:
            return "amx_bf16" in fh.read()
    except OSError:
        return False


_MALLOC_TRIM = None
# glibc's mallopt parameters (malloc.h) and the environment that sets them by hand
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_USER_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                    "MALLOC_TOP_PAD_")


def keep_host_memory(device):
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


def trim_host_memory(device):
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


def use_channels_last(cfg, accelerator):
    """--channels-last / --no-channels-last, or the measured default (see config.py)."""
    if cfg.channels_last is not None:
        return cfg.channels_last
    return not (accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
                and not cpu_has_native_bf16())


RUN_FILES = ("results.json", "metrics.jsonl", "best", "checkpoints")  # what a run writes


def _check_output_dir(cfg, output_dir, is_main):
    """Never train over an earlier run by accident, and never delete what we did not write.
    Every rank checks (so all stop together); the main one deletes."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if not found or cfg.resume_from_checkpoint:
        return
    if not cfg.overwrite_output_dir:
        what = "a finished run" if "results.json" in found else "an unfinished run"
        hint = ("" if "results.json" in found
                else "--resume-from-checkpoint latest to continue it, or ")
        raise UserError(f"--output-dir {output_dir} already holds {what} ({', '.join(found)}); "
                        f"use {hint}--overwrite-output-dir to replace it, or another folder")
    if not is_main:
        return
    for f in found:  # only our own files; anything else in the folder stays
        path = os.path.join(output_dir, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    print(f"--overwrite-output-dir: removed {', '.join(found)} from {output_dir}")


def setup_run(cfg, script):
    """Return (accelerator, output_dir): seeded, run folder created, config saved there."""
    cpu = launcher_chose_cpu()
    state = PartialState(cpu=cpu)  # starts torch.distributed when launched with N processes
    world = int(os.environ.get("WORLD_SIZE", 1))
    if state.num_processes != world:
        raise UserError(
            f"the launcher started {world} processes but each sees {state.num_processes} "
            f"({state.distributed_type}); on CPU use accelerate_configs/cpu_2proc.yaml "
            "(distributed_type MULTI_GPU + use_cpu: true), see accelerate_configs/README.md")
    output_dir = _output_dir(cfg, script, state)
    _check_output_dir(cfg, output_dir, state.is_main_process)
    state.wait_for_everyone()
    log_with = resolve_report_to(cfg.report_to, state.is_main_process)
    accelerator = Accelerator(
        cpu=cpu,
        project_dir=output_dir,  # TensorBoard logs and Accelerate checkpoints go here
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        # Shuffle with seed + epoch, the same permutation on every rank (each takes its shard),
        # reproducible after a resume without replaying earlier epochs.
        # Batches are copied to the GPU without blocking the host (the loaders pin memory
        # when CUDA is there): a blocking copy would be a host sync per step.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=not cpu),
        # we step the LR schedule per optimiser step ourselves (see common/optim.py)
        step_scheduler_with_optimizer=False,
    )
    on_cpu = accelerator.device.type == "cpu"
    # (keep_host_memory, ~1.9x faster CPU steps, comes once the data is loaded: data.py)
    if on_cpu and accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        accelerator.print("warning: bf16 on a CPU without AMX/AVX512-BF16 is emulated and "
                          "slower than fp32; consider --mixed_precision no")
    if accelerator.mixed_precision == "no" and (
            (not on_cpu and gpu_has_native_bf16(accelerator.device)) or
            (on_cpu and cpu_has_amx())):
        accelerator.print("hint: this " + ("GPU" if not on_cpu else "CPU (AMX)") + " computes "
                          "bf16 natively, usually ~2x faster for training than fp32: "
                          "accelerate launch --mixed_precision bf16 ... (see benchmarks/README.md)")
    if on_cpu and accelerator.mixed_precision == "fp16":
        accelerator.print("warning: Accelerate does not autocast fp16 on CPU; use bf16 "
                          "(on CPUs with AMX) or no")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        save_config(dataclasses.replace(cfg, output_dir=output_dir),
                    os.path.join(output_dir, "config.yaml"))
    accelerator.wait_for_everyone()
    # The same seed on every rank while the model is built: identical new heads everywhere
    # (DDP would broadcast rank 0's anyway; the cached-feature extractor has no DDP to do it).
    # seed_for_training() then gives each rank its own stream.
    set_seed(cfg.seed)
    return accelerator, output_dir


def seed_for_training(accelerator, seed):
    """Before the first training step: seed + process index on each rank, so dropout and
    drop-path masks differ between processes (each sees different images; identical masks
    would correlate their noise, as timm's train.py avoids too). What must be identical
    everywhere does not come from this RNG: the data order (the sampler's seed + epoch, the
    same permutation on every rank) and the augmentation (seeded per image by seed, epoch and
    index in common/data.py, so independent of the process count)."""
    set_seed(seed, device_specific=True)


def bare_model(accelerator, model):
    """The module that holds the weights, with DDP and torch.compile's wrapper taken off.
    Not accelerator.unwrap_model's default: since accelerate 1.3 that can keep the compile
    wrapper (state_dict keys '_orig_mod.*': an export nothing else can load), and to keep it
    sets the wrapper's _orig_mod to the module without DDP."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def rewrap_ddp(accelerator, model):
    """Build DDP again around the same module, after parameters were frozen or unfrozen.

    DDP registers the parameters that require grad when it is built and expects a gradient
    for each of them in every backward. --freeze-epochs therefore wraps the model with only
    the heads trainable, and again with every parameter when the backbone unfreezes: both
    phases run without `find_unused_parameters` (a graph walk per step). A parameter frozen
    when DDP was built would never be synchronised after unfreezing, which is why the wrap
    is renewed, not kept. Single-process models are returned as they are."""
    compiled = hasattr(model, "_orig_mod")  # --compile: DDP inside torch.compile's wrapper
    ddp = model._orig_mod if compiled else model
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        return model
    # (Accelerate keeps the unwrapped module in its list of models: nothing to update there)
    new = torch.nn.parallel.DistributedDataParallel(
        ddp.module, device_ids=ddp.device_ids, output_device=ddp.output_device)
    return torch.compile(new) if compiled else new
