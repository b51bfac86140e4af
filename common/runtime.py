"""The Accelerator, the run folder and the seed: what every run sets up first.

CPU multi-process trap (accelerate 1.15): a launcher config with `use_cpu: true` does not
pass that on to the worker processes, so an Accelerator built without `cpu=True` on a machine
without CUDA either fails or believes it is alone. We build it with `cpu=True` whenever CUDA
is absent and then check that it sees as many processes as the launcher started.
"""

import dataclasses
import os
import shutil
import time

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs,
                               broadcast_object_list, set_seed)

from common.config import save_config
from common.errors import UserError
from common.tracking import resolve_report_to


def _output_dir(cfg, script, state):
    """The run folder: --output-dir, or outputs/<script>-<time> as the main process reads the
    clock (other ranks may read it a second later)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    chosen = [cfg.output_dir or os.path.join("outputs", f"{script}-{stamp}")]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    return chosen[0]


def cpu_has_native_bf16():
    """AMX or AVX512-BF16 (Linux /proc/cpuinfo): without them bf16 autocast is emulated and
    slower than fp32 (measured on an AVX2 EPYC: EfficientNet-Lite0 1.8 vs 5.7 img/s)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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
    cpu = not torch.cuda.is_available()
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
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # we step the LR schedule per optimiser step ourselves (see common/optim.py)
        step_scheduler_with_optimizer=False,
        # --freeze-epochs: DDP is built with every parameter trainable (a parameter frozen at
        # construction would never be synchronised after unfreezing); while the backbone is
        # frozen its parameters get no gradient, and find_unused_parameters lets DDP accept
        # that and leave their .grad unset, so the optimiser does not touch them.
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=getattr(cfg, "freeze_epochs", 0) > 0)],
    )
    on_cpu = accelerator.device.type == "cpu"
    if on_cpu and accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        accelerator.print("warning: bf16 on a CPU without AMX/AVX512-BF16 is emulated and "
                          "slower than fp32; consider --mixed_precision no")
    if on_cpu and accelerator.mixed_precision == "fp16":
        accelerator.print("warning: Accelerate does not autocast fp16 on CPU; use bf16 "
                          "(on CPUs with AMX) or no")
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        save_config(dataclasses.replace(cfg, output_dir=output_dir),
                    os.path.join(output_dir, "config.yaml"))
    accelerator.wait_for_everyone()
    # Same seed on every rank: identical head init; the data order is the sampler's own seed.
    set_seed(cfg.seed)
    return accelerator, output_dir
