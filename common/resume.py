"""Resuming a run: the checkpoint read before anything is built, its progress converted to
this run's world, then applied to the prepared model, optimiser and schedule.

Checkpoints (common/checkpoint.py) are taken only right after an optimiser step, so no
half-accumulated gradient is ever lost. A resumed run restores model, optimiser, RNG states,
counters and the epoch's running sums, re-seeds the sampler for the epoch in progress and
skips the batches already done; with augmentation seeded per sample (common/data.py) it then
computes exactly what the uninterrupted run would have. On another number of processes (or
batch size) the progress is converted, when the samples already seen make a whole number of
the new global batches; otherwise the run refuses, naming an epoch-end checkpoint.
"""

from __future__ import annotations

import math
import os
from typing import Optional, TYPE_CHECKING

from accelerate.utils import broadcast_object_list

from common.checkpoint import (Checkpoint, TrainState, apply_checkpoint, check_optimizer,
                               load_checkpoint, read_checkpoint, restore_best,
                               set_aside_later_checkpoints)
from common.errors import RunFailure, UserError
from common.files import read_jsonl, write_csv, write_jsonl
from common.log import logger
from common.optim import position_scheduler


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig
    from torch import nn
    from torch.optim.lr_scheduler import LRScheduler
    import torch


def read_resume(accelerator: Accelerator, cfg: TrainConfig,
                output_dir: str) -> Optional[Checkpoint]:
    """The checkpoint named by --resume-from-checkpoint, read and checked (not applied)."""
    if not cfg.resume_from_checkpoint:
        return None
    if accelerator.num_processes == 1:
        return load_checkpoint(cfg.resume_from_checkpoint, output_dir)
    # the main process chooses (`latest` and its fallback past a damaged checkpoint) and
    # the others read its choice: processes that chose alone could resume different steps
    choice = [None, None]  # the folder, or the error that refused every candidate
    if accelerator.is_main_process:
        try:
            ckpt = load_checkpoint(cfg.resume_from_checkpoint, output_dir)
            choice[0] = ckpt.path
        except (UserError, RunFailure) as e:
            choice[1] = (type(e) is UserError, str(e))
    broadcast_object_list(choice)
    if choice[1] is not None:
        user_error, message = choice[1]
        raise (UserError if user_error else RunFailure)(message)
    if accelerator.is_main_process:
        return ckpt
    return read_checkpoint(choice[0], keep_best=False)  # only the main one restores best/


def check_resumed_run(cfg: TrainConfig, ckpt: Checkpoint, class_names: list,
                      data_identity: Optional[str]) -> Optional[float]:
    """A checkpoint must resume on the classes it was trained on, in the same order (labels
    are positions in that list), at the peak lr it trained with. Returns that lr (None when
    the checkpoint does not record one). `data_identity`: this run's (main process; None
    elsewhere): images changed since the checkpoint are said, not refused.

    Raises UserError: other class names or order; a --lr other than the checkpoint's."""
    state, where = ckpt.state, f"--resume-from-checkpoint {ckpt.path}"
    check_optimizer(ckpt, cfg.optimizer)  # first: another optimiser has another default lr
    if state.class_names is not None and list(state.class_names) != list(class_names):
        def listed(names):
            return ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else "")
        raise UserError(f"{where}: it was trained on the classes [{listed(state.class_names)}]"
                        f" and this data has [{listed(class_names)}]; its labels would not "
                        "mean the same classes: resume on the data it was trained on, or "
                        "start without it")
    if data_identity and state.data_identity and data_identity != state.data_identity:
        logger.warning(f"{where}: the images are not those it was trained on (files added, "
                       "removed or changed since); resuming on these")
    if state.lr is not None and cfg.lr != "auto" and not math.isclose(cfg.lr, state.lr):
        raise UserError(f"{where}: it trains at peak lr {state.lr:g} and --lr is {cfg.lr:g}; "
                        f"resume with --lr {state.lr:g} (or --lr auto, which takes the "
                        "checkpoint's)")
    if state.lr is None and cfg.lr == "auto":
        raise UserError(f"{where}: it does not record the lr it trained with; resume with "
                        "the --lr it was started with")
    return state.lr


def convert_progress(accelerator: Accelerator, cfg: TrainConfig, state: TrainState, loader_len: int,
                     steps_per_epoch: int) -> None:
    """A checkpoint counted on another number of processes (or batch size): express its
    progress in this run's batches and optimiser steps, or refuse."""
    world = (accelerator.num_processes, cfg.batch_size, cfg.gradient_accumulation_steps)
    saved = (state.num_processes, state.batch_size, state.gradient_accumulation_steps)
    if world == saved or not state.batch_size:
        return
    samples = state.batches_done * state.batch_size * state.num_processes
    per_step = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    if samples % per_step:
        raise UserError(
            f"--resume-from-checkpoint: this checkpoint was taken {state.batches_done} batches "
            f"into epoch {state.epoch + 1} with {state.num_processes} process(es) x batch "
            f"{state.batch_size}; its {samples} images are not a whole number of this run's "
            f"optimiser steps ({accelerator.num_processes} x {cfg.batch_size} x "
            f"{cfg.gradient_accumulation_steps}). Resume with the same processes and "
            "--batch-size, or from an epoch-end checkpoint (any world size)")
    skipped = state.step - state.schedule_position()  # by the fp16 GradScaler
    state.batches_done = samples // (cfg.batch_size * accelerator.num_processes)
    state.step = state.epoch * steps_per_epoch + state.batches_done // \
        cfg.gradient_accumulation_steps
    state.schedule_steps = max(0, state.step - skipped)
    logger.info(f"resuming a checkpoint of {saved[0]} process(es) x batch {saved[1]} on "
                f"{world[0]} x {world[1]}: epoch {state.epoch + 1}, batch "
                f"{state.batches_done}/{loader_len}, optimiser step {state.step} (same "
                "images seen; not bit-identical to an uninterrupted run)")


def apply_resume(accelerator: Accelerator, cfg: TrainConfig, ckpt: Checkpoint, model: nn.Module,
                 optimizer: torch.optim.Optimizer, *, scheduler: LRScheduler, loader_len: int,
                 steps_per_epoch: int, output_dir: str) -> None:
    """Put the prepared model, optimiser and schedule where the checkpoint stood; the main
    process sets aside later checkpoints, restores best/ and cuts metrics.jsonl back."""
    state = ckpt.state
    convert_progress(accelerator, cfg, state, loader_len, steps_per_epoch)
    apply_checkpoint(accelerator, ckpt, model, optimizer)
    # the schedule's own position: an fp16 run's schedule waited on the skipped steps
    position_scheduler(scheduler, state.schedule_position())
    if accelerator.is_main_process:
        set_aside_later_checkpoints(output_dir, state.step)
        restore_best(output_dir, ckpt)
        metrics_path = os.path.join(output_dir, "metrics.jsonl")
        if os.path.exists(metrics_path):
            # rows the interrupted run wrote after this checkpoint will be computed again
            rows, torn = read_jsonl(metrics_path)
            if torn:
                logger.info(f"{metrics_path}: its last line was cut off by the crash; "
                            "dropped (that row is computed again)")
            kept = [r for r in rows if r["epoch"] <= state.epoch]
            write_jsonl(metrics_path, kept)
            write_csv(os.path.join(output_dir, "summary.csv"), kept)  # the same rows, flat
    accelerator.wait_for_everyone()
    logger.info(f"Resuming from {ckpt.path}: epoch {state.epoch + 1}, batch "
                f"{state.batches_done}, optimiser step {state.step}")
