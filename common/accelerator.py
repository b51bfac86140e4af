"""The Accelerator and the seed: what every run sets up first (the run folder: rundir.py).

CPU multi-process trap (accelerate 1.15/1.16): a launcher config with `use_cpu: true` does
not pass that on to the worker processes of a multi-process launch, so an Accelerator built
without `cpu=True` on a machine without CUDA either fails or believes it is alone. We build
it with `cpu=True` when the launcher asked for the CPU (`ACCELERATE_USE_CPU`, which
`accelerate launch --cpu` and one-process `use_cpu: true` configs set) or CUDA is absent,
and then check that it sees as many processes as the launcher started.
accelerate_configs/cpu_2proc.yaml hides the GPUs from its workers itself (see there).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed

from common.config import save_config
from common.errors import UserError
from common.files import remove_stale_temporaries
from common.log import drop_held_lines, log_path, log_to_file, logger, setup_logging
from common.hardware import (cpu_has_amx, cpu_has_native_bf16, gpu_has_native_bf16,
                             launcher_chose_cpu)
from common.rundir import check_output_dir, choose_output_dir
from common.tracking import resolve_report_to


if TYPE_CHECKING:  # names for the type hints only
    from common.config import TrainConfig
    from torch import nn


# what `accelerate launch` sets for a config of each sharded strategy
_SHARDED = (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
            ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"))


def refuse_sharded_training() -> None:
    """The loop trains DDP-style: a whole model on every process, its state dicts taken on
    the main one. Under FSDP or DeepSpeed that would hang or save part of the model.

    Raises UserError naming the configs that work."""
    for var, name in _SHARDED:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes"):
            raise UserError(f"this launch uses {name} ({var}); these scripts train a whole "
                            "copy of the model on each process (DDP): launch with "
                            "accelerate_configs/multi_gpu.yaml or multi_gpu_bf16.yaml (or "
                            "single_gpu*.yaml, cpu.yaml, cpu_2proc.yaml, multi_node.yaml)")


def _remove_stale_temporaries(output_dir: str, started: float) -> None:
    """What a killed earlier session left in the run folder (an export, a folder set aside,
    a half-written file): removed at the start, before this job writes any of its own."""
    for folder in (output_dir, os.path.join(output_dir, "best"),
                   os.path.join(output_dir, "checkpoints")):
        removed = remove_stale_temporaries(folder, started)
        if removed:
            logger.info(f"removed what an interrupted run left in {folder}: "
                        f"{', '.join(sorted(removed))}")


def setup_run(cfg: TrainConfig, script: str, started: float) -> tuple[Accelerator, str]:
    """Return (accelerator, output_dir): seeded, run folder created (what a killed earlier
    session left there removed: temporaries older than `started`, the job's start),
    config saved there.

    Raises UserError: a launch whose processes do not see each other, a sharded (FSDP /
    DeepSpeed) launch config, an output folder holding a run."""
    setup_logging(cfg.log_level, cfg.quiet)
    cpu = launcher_chose_cpu()
    state = PartialState(cpu=cpu)  # starts torch.distributed when launched with N processes
    world = int(os.environ.get("WORLD_SIZE", 1))
    if state.num_processes != world:
        raise UserError(
            f"the launcher started {world} processes but each sees {state.num_processes} "
            f"({state.distributed_type}); on CPU use accelerate_configs/cpu_2proc.yaml "
            "(distributed_type MULTI_GPU + use_cpu: true), see accelerate_configs/README.md")
    refuse_sharded_training()
    output_dir = choose_output_dir(cfg, script, state)
    check_output_dir(cfg, output_dir, state.is_main_process)
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
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        _remove_stale_temporaries(output_dir, started)
        log_to_file(log_path(output_dir))  # with the lines said so far
        save_config(dataclasses.replace(cfg, output_dir=output_dir),
                    os.path.join(output_dir, "config.yaml"))
    else:
        drop_held_lines()  # one train.log per run: the main process's
    on_cpu = accelerator.device.type == "cpu"
    # (keep_host_memory, ~1.9x faster CPU steps, comes once the data is loaded: data.py)
    if on_cpu and accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        logger.warning("bf16 on a CPU without AMX/AVX512-BF16 is emulated and "
                       "slower than fp32; consider --mixed_precision no")
    if accelerator.mixed_precision == "no" and (
            (not on_cpu and gpu_has_native_bf16(accelerator.device)) or
            (on_cpu and cpu_has_amx())):
        logger.info("hint: this " + ("GPU" if not on_cpu else "CPU (AMX)") + " computes "
                    "bf16 natively, usually ~2x faster for training than fp32: "
                    "accelerate launch --mixed_precision bf16 ... (see benchmarks/README.md)")
    if on_cpu and accelerator.mixed_precision == "fp16":
        logger.warning("Accelerate does not autocast fp16 on CPU; use bf16 "
                       "(on CPUs with AMX) or no")
    accelerator.wait_for_everyone()
    # The same seed on every rank while the model is built: identical new heads everywhere
    # (DDP would broadcast rank 0's anyway; the cached-feature extractor has no DDP to do it).
    # seed_for_training() then gives each rank its own stream.
    set_seed(cfg.seed)
    return accelerator, output_dir


def seed_for_training(accelerator: Accelerator, seed: int) -> None:
    """Before the first training step: seed + process index on each rank, so dropout and
    drop-path masks differ between processes (each sees different images; identical masks
    would correlate their noise, as timm's train.py avoids too). What must be identical
    everywhere does not come from this RNG: the data order (the sampler's seed + epoch, the
    same permutation on every rank) and the augmentation (seeded per image by seed, epoch and
    index in common/data.py, so independent of the process count)."""
    set_seed(seed, device_specific=True)


def bare_model(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The module that holds the weights, with DDP and torch.compile's wrapper taken off.
    Not accelerator.unwrap_model's default: since accelerate 1.3 that can keep the compile
    wrapper (state_dict keys '_orig_mod.*': an export nothing else can load), and to keep it
    sets the wrapper's _orig_mod to the module without DDP."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)
