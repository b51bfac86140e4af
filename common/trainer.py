"""`fit`: epochs of training and evaluation around common/engine.py's step, read top to
bottom.

Setup, in this order (each line's reason beside it): read the checkpoint to resume (before
`prepare`: the phase it is in decides how DDP is built) -> freeze for that phase -> prepare
model, optimiser and loaders -> LR range test (fresh runs with --find-lr / --lr auto) ->
peak lr -> the schedule's length (--epochs auto: auto_epochs) -> schedule -> EMA ->
apply the checkpoint -> start the tracker -> RNG states last.

Then the epochs: phase (freeze or unfreeze) -> one epoch of `train_epoch`, which yields
after each optimiser step so that this loop logs, checkpoints and stops -> evaluate (and the
EMA) -> keep the best (best/) -> metrics row -> checkpoint -> early stop. Then results.json,
the pictures and the model card (common/report.py).

Parts, one concern each: the phase (common/phase.py), the best model (common/best.py), when
to checkpoint (common/checkpoint.py CheckpointPolicy), resuming (common/resume.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
import time
from typing import Optional, TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from common.accelerator import bare_model, seed_for_training
from common.best import BestKeeper
from common.checkpoint import CheckpointPolicy, TrainState, restore_rng
from common.data import Data, data_identity, num_workers, set_epoch
from common.ema import ModelEma
from common.engine import (BatchMix, StopSignal, Sums, Totals, check_finite, evaluate,
                           last_batch_remainder, make_loss, reduce_sums, train_epoch)
from common.files import append_jsonl, read_jsonl, write_csv
from common.log import logger, progress_bars
from common.lr_finder import find_lr
from common.metrics import load_metrics, score
from common.models import Network
from common.optim import build_scheduler, group_lrs, set_peak_lr
from common.phase import Phase, rewrap_ddp
from common.probe import Probe
from common.report import finish
from common.resume import apply_resume, check_resumed_run, read_resume
from common.tracking import log_metrics, log_pictures, start_run, tracker_run_id
from common.viz import augmentation_preview_png


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig


def auto_epochs(cfg: TrainConfig, steps_per_epoch: int, train_images: int) -> tuple[int, str]:
    """--epochs auto: (epochs, why). --budget-epochs, as long as they hold between
    --budget-min-steps and --budget-steps optimiser steps (rounded up to whole epochs), but at
    least --budget-min-epochs; at most --budget training images seen. Read off the suite's
    curves: sets of a few hundred images reach their best within ~50 steps (hotdog,
    rice_leaf: 9 epochs), brain_mri (400 images) needs ~100 (8 epochs), clothing (990) the
    150 steps of 5 epochs; from a few thousand images on the 150 steps are under one epoch,
    and cifar10's 10,000 images gain from 1 to 3 epochs (benchmarks/README.md)."""
    cap = max(cfg.budget_steps, cfg.budget_min_epochs * steps_per_epoch)
    steps = min(max(cfg.budget_epochs * steps_per_epoch, cfg.budget_min_steps), cap)
    epochs = max(1, math.ceil(steps / steps_per_epoch))
    why = (f"{train_images} images: {cfg.budget_epochs} epochs within "
           f"{cfg.budget_min_steps}-{cap} optimiser steps")
    if cfg.budget is not None and epochs * train_images > cfg.budget:
        epochs = max(1, cfg.budget // train_images)
        why = f"--budget {cfg.budget} images seen"
    return epochs, why


def fit(accelerator: Accelerator, cfg: TrainConfig, network: Network, data: Data,
        optimizer: torch.optim.Optimizer, *, output_dir: str, started: float,
        probe: Optional[Probe] = None, figures: Optional[dict] = None) -> dict:
    """Train `network.trained` for cfg.epochs, evaluating after each epoch (only the start
    model with --epochs 0); export the best model by --select-metric to best/; checkpoint;
    write metrics.jsonl and results.json. `started`: time.time() at the script's start;
    `probe`: the linear probe's result (its model is then evaluated as epoch 0); `figures`:
    numbers measured before (the feature cache's) for results.json. Returns the results.

    Raises UserError: a checkpoint that cannot be read or does not fit this world, a
    non-finite training loss, a diverging LR range test."""
    ckpt = read_resume(accelerator, cfg, output_dir)
    state = ckpt.state if ckpt else TrainState()
    freeze_epochs = (cfg.freeze_epochs if cfg.script == "finetune"
                     else 0 if network.feature_heads is not None else None)
    phase = Phase(network.trained_head_names, freeze_epochs, getattr(cfg, "bn_eval", False))
    phase.set(network.trained, phase.frozen_at(state.epoch))  # before DDP is built around it
    model = network.trained.to(memory_format=torch.channels_last) if network.channels_last \
        else network.trained
    # prepare moves the model to the device and wraps it in DDP; the optimiser is rewrapped
    # so that it skips steps while gradients accumulate; the loaders are sharded and their
    # batches moved to the device
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, data.train_loader, data.val_loader)
    if cfg.compile:  # after DDP: torch.compile wraps the DDP module (rewrap_ddp keeps it so)
        model = torch.compile(model)
    # the schedule's length, known once the loader is sharded; --epochs auto is resolved here,
    # before anything trains, and cfg does not change after this line
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    # real samples in an epoch's last global batch: of the whole epoch's loader, also when a
    # resumed epoch skips its first batches
    remainder = last_batch_remainder(train_loader, accelerator.num_processes)
    schedule = f"--epochs {cfg.epochs}"
    if cfg.epochs == "auto":
        epochs, why = auto_epochs(cfg, steps_per_epoch, len(data.train_images))
        cfg, schedule = dataclasses.replace(cfg, epochs=epochs), f"{epochs} epochs ({why})"
    loss_fn = make_loss(cfg.label_smoothing, data.class_weights)
    mix = BatchMix(cfg.mixup, cfg.cutmix, len(data.class_names), cfg.seed) \
        if cfg.mixup or cfg.cutmix else None
    identity = data_identity(data) if accelerator.is_main_process else None
    if ckpt:  # the same classes, in the same order, at the lr it trained with
        check_resumed_run(cfg, ckpt, data.class_names, identity)
    found = None
    if not ckpt and (cfg.find_lr or cfg.lr == "auto"):
        found = _lr_range_test(accelerator, cfg, network, phase, model, optimizer,
                               train_loader, loss_fn, mix, probe, output_dir)
        if cfg.find_lr and cfg.lr != "auto":  # --find-lr alone: report and stop
            accelerator.end_training()
            return {"suggested_lr": found}
    # a checkpoint taken in another run folder (forked, or someone else's) starts a new
    # tracker run that records the one it came from, never writing into that one
    forked_from = None
    if ckpt and state.run_dir != os.path.realpath(output_dir):
        forked_from, state.tracker_run_id = state.tracker_run_id, None
    if not ckpt:
        state.lr = found if found is not None else cfg.lr
        state.class_names, state.data_identity = list(data.class_names), identity
    state.run_dir = os.path.realpath(output_dir)
    # before the schedule: it takes the peaks as built (--lr auto's placeholder replaced)
    set_peak_lr(optimizer, state.lr)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    ema = ModelEma(bare_model(accelerator, model), cfg.model_ema_decay) if cfg.model_ema \
        else None
    if ckpt:
        apply_resume(accelerator, cfg, ckpt, model, optimizer, scheduler=scheduler,
                     loader_len=len(train_loader), steps_per_epoch=steps_per_epoch,
                     output_dir=output_dir)
        if ema is not None and "ema" in ckpt.extra:
            ema.load_state_dict(ckpt.extra["ema"], ckpt.state.ema_updates)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    _announce(accelerator, cfg, network, data, state, global_batch, steps_per_epoch,
              output_dir, forked_from, schedule)
    # last, after everything that might draw random numbers: each rank's own stream
    if ckpt:
        restore_rng(accelerator, ckpt, cfg.seed)
        del ckpt  # applied: its tensors (a model and optimiser's worth) are not held all run
    else:
        seed_for_training(accelerator, cfg.seed)

    earlier_seconds = state.wall_seconds  # of the sessions before a resume
    keeper = BestKeeper(accelerator, cfg, network, data.class_names, output_dir)
    checkpoints = CheckpointPolicy(cfg, output_dir)
    stop = StopSignal()  # handlers of this run only: put back in the finally below

    # the helpers below read `model` and `ema` when called: the model as the phase last
    # wrapped it, the EMA as last restarted
    def log(values):
        log_metrics(accelerator, {**values, "train/step": state.step}, state.step)

    def save():
        return checkpoints.save(accelerator, state, model, optimizer, ema=ema,
                                wall_seconds=earlier_seconds + time.time() - started)

    def stop_now():
        path = save()
        signum = stop.signum or signal.SIGTERM
        logger.info(f"Stopped by {signal.Signals(signum).name}: saved {path}; continue "
                    f"with --resume-from-checkpoint latest --output-dir {output_dir}")
        accelerator.end_training()
        raise SystemExit(128 + signum)

    def out_of_steps():  # --max-train-steps, counted over every session of the run
        return bool(cfg.max_train_steps) and state.step >= cfg.max_train_steps

    def evaluate_on_val(module):
        return evaluate(module, val_loader, load_metrics(accelerator), data.class_names,
                        accelerator=accelerator, tta=cfg.tta,
                        channels_last=network.channels_last, progress=progress_bars())

    def evaluate_and_keep(row, t0, val_m=None):
        """Val metrics of the model (and its EMA), the metrics row, the best so far.
        `val_m`: the model's metrics where they are known (the probe's, at epoch 0)."""
        val_m = val_m or evaluate_on_val(model)
        logger.info(_epoch_line("val", val_m))
        candidates = [("model", val_m, model)]
        if ema is not None and row["epoch"] > 0:
            ema.sync(accelerator)  # every rank scores (and may keep) rank 0's average
            ema_m = evaluate_on_val(ema.module)
            logger.info(_epoch_line("val (EMA)", ema_m))
            candidates.append(("ema", ema_m, ema.module))
            row.update({f"ema_val_{k}": ema_m[k] for k in ("accuracy", "loss", "macro_f1")})
        row.update({f"val_{k}": v for k, v in val_m.items()
                    if k not in ("confusion_matrix", "predictions")},
                   lr=optimizer.param_groups[0]["lr"], lr_groups=group_lrs(optimizer),
                   seconds=time.time() - t0)
        log({**{k.replace("_", "/", 1): v for k, v in row.items()
                if isinstance(v, (int, float)) and k != "lr"},
             "train/lr": row["lr"],
             **{f"train/lr_{k}": v for k, v in row["lr_groups"].items() if k != "head"},
             **{f"val/{m}/{c}": v for c, d in val_m["per_class"].items()
                for m, v in d.items()}})
        source, best_m, module = max(candidates, key=lambda c: score(c[1], cfg.select_metric))
        keeper.consider(state, row["epoch"], best_m, source, module, stage=row["stage"])
        if accelerator.is_main_process:
            append_jsonl(os.path.join(output_dir, "metrics.jsonl"), row)
            # the same rows flat (scalars only), for pandas and spreadsheets
            write_csv(os.path.join(output_dir, "summary.csv"),
                      read_jsonl(os.path.join(output_dir, "metrics.jsonl"))[0])
        return val_m

    def stage(epoch_index):
        """What trains in an epoch: the heads alone, or every layer."""
        return "head" if network.feature_heads is not None or phase.frozen_at(epoch_index) \
            else "all-layers"

    val_m, stopped_early, first_step_seconds, pace_t0 = None, None, None, None
    # for the epoch line's time left: this session's pace, evaluations included
    session_t0, session_step0 = time.time(), state.step
    planned_steps = max(cfg.epochs, 1) * steps_per_epoch
    if cfg.max_train_steps:
        planned_steps = min(planned_steps, cfg.max_train_steps)
    try:
        if probe is not None and cfg.epochs and state.best is None and state.epoch == 0 \
                and state.batches_done == 0:
            logger.info(f"Epoch 0/{cfg.epochs}: the linear probe's head on the frozen backbone")
            val_m = evaluate_and_keep({"epoch": 0, "stage": "probe"}, time.time(),  # kept
                                      probe.val_metrics)
            if probe.fresh_heads is not None:  # unless beaten; --finetune-from random
                ema = _restart_heads(network, probe, ema, cfg)
        while state.epoch < max(cfg.epochs, 1):
            if out_of_steps():  # a time box resumed with the same --max-train-steps
                break
            epoch_t0 = time.time()
            row = {"epoch": state.epoch + 1, "stage": stage(state.epoch)} if cfg.epochs \
                else {"epoch": 0, "stage": "start"}  # --epochs 0: the model as it starts
            stopping = partial = False
            if not cfg.epochs:
                logger.info("Epoch 0/0: the model as it starts (--epochs 0)")
            if cfg.epochs:
                model = phase.enter(accelerator, model, state.epoch, say=logger.info)
                set_epoch(train_loader, state.epoch)
                loader = train_loader
                if state.batches_done:  # resumed mid-epoch: skip what was trained on
                    loader = (loader.skip(state.batches_done) if hasattr(loader, "skip")
                              else accelerator.skip_first_batches(loader, state.batches_done))
                bar = _bar(accelerator, loader, state, len(train_loader))
                # the epoch's sums (resumed mid-epoch: the earlier part, counted once) and
                # the window since the last log point, summed on the device
                epoch_sums = Sums(accelerator.device, state.train_sums
                                  if accelerator.is_main_process else None)
                window = Sums(accelerator.device)
                resumed_samples = state.train_sums.samples  # trained before a mid-epoch resume
                train_t0 = time.time()
                for _ in train_epoch(model, bar, optimizer, scheduler, state, loss_fn=loss_fn,
                                     sums=(epoch_sums, window), accelerator=accelerator,
                                     remainder=remainder, mix=mix,
                                     channels_last=network.channels_last):
                    if first_step_seconds is None:  # start-up, from the script's first line
                        first_step_seconds = round(time.time() - started, 2)
                        pace_t0 = time.time()
                    elif state.step - session_step0 == PACE_STEPS + 1:
                        _expect(cfg, planned_steps - state.step,
                                (time.time() - pace_t0) / PACE_STEPS, global_batch)
                    if ema is not None and not accelerator.optimizer_step_was_skipped:
                        ema.update(bare_model(accelerator, model))
                    due = checkpoints.due_at(state.step)
                    if state.step % cfg.log_every == 0 or due:
                        # a log point: one all-reduce of the window's sums and the stop flag
                        totals, stopping = reduce_sums(accelerator, window, stop)
                        window.reset()
                        check_finite(totals, state)  # never checkpoint a diverged model
                        values = _train_values(totals, optimizer, state, len(train_loader))
                        log(values)
                        bar.set_postfix(loss=f"{values['train/loss']:.4f}",
                                        lr=f"{values['train/lr']:.2e}")
                        if due or stopping:
                            state.train_sums = reduce_sums(accelerator, epoch_sums, stop)[0]
                            save()
                        if stopping:
                            stop_now()
                    if out_of_steps():
                        break
                totals, stopping = reduce_sums(accelerator, epoch_sums, stop)
                check_finite(totals, state)
                # --max-train-steps can end the epoch early: its position is kept (a resumed
                # time box trains the rest of this epoch), its row says it is partial, and
                # its checkpoint is taken before the evaluation, like a mid-epoch one, so
                # that the resumed run is the uninterrupted one
                partial = state.batches_done < len(train_loader)
                # images/s of the whole loop (loading, forward, backward, step): what
                # benchmarks/loader_vs_model.py compares with the bare model
                train_m = dict(totals.metrics(), seconds=time.time() - train_t0)
                row.update({f"train_{k}": v for k, v in train_m.items()})
                seconds_per_step = (time.time() - session_t0) / max(
                    state.step - session_step0, 1)
                left = (planned_steps - state.step) * seconds_per_step
                logger.info(f"Epoch {state.epoch + 1}/{cfg.epochs}"
                            + (f" (partial: batch {state.batches_done}/"
                               f"{len(train_loader)})" if partial else "")
                            + (f", about {_minutes(left)} left" if left > 0 else "")
                            + f"\n{_epoch_line('train', train_m)}, "
                            f"{(totals.samples - resumed_samples) / train_m['seconds']:.1f} "
                            "img/s")
                if partial:
                    row["partial"] = True
                    state.train_sums = totals  # over all processes, as saved
                    if checkpoints.mid_epoch:
                        save()
            val_m = evaluate_and_keep(row, epoch_t0)
            if not (cfg.epochs and partial):  # (a time box's epoch goes on next session)
                state.epoch, state.batches_done = state.epoch + 1, 0
                state.train_sums = Totals()
                if cfg.epochs and (checkpoints.at_epoch_end or stopping):
                    save()
            if stopping:
                stop_now()
            if out_of_steps():
                logger.info(f"--max-train-steps {cfg.max_train_steps}: done")
                break
            if cfg.patience and cfg.epochs and \
                    state.epoch - state.best.epoch >= cfg.patience:
                stopped_early = state.epoch
                logger.info(
                    f"early stop after epoch {state.epoch}: val {cfg.select_metric} not "
                    f"better than epoch {state.best.epoch}'s for {cfg.patience} epochs "
                    "(--patience)")
                break
        if state.best is None:  # a time box resumed at its end, its evaluation not yet kept
            row = {"epoch": state.epoch + 1, "stage": stage(state.epoch)}
            if state.batches_done:  # the partial epoch's row, as the first session wrote it
                row.update({f"train_{k}": v for k, v in state.train_sums.metrics().items()},
                           partial=True)
            val_m = evaluate_and_keep(row, time.time())
        elif val_m is None:  # resumed from a checkpoint taken after the last epoch
            val_m = evaluate_on_val(model)
    finally:  # a notebook's next run (or its Ctrl-C) gets the handlers it had before
        stop.restore()

    figures = dict(figures or {}, **(probe.figures if probe else {}))
    # the reported figures are the exported model's, fp32 on the val images (predict.py's)
    reason = keeper.rescore_reason(figures.get("extract_precision"))
    if reason:
        images = val_loader if network.feature_heads is None else \
            _image_loader(accelerator, cfg, data.val_images)
        rescored = keeper.rescore(state, images, reason)
        figures.update(best_val_accuracy_when_chosen=rescored["chosen_accuracy"],
                       best_scored_again_because=reason)
    figures = dict(figures,
                   first_step_seconds=first_step_seconds,
                   peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                     / 1024, 1))  # of the main process
    return finish(accelerator, cfg, network=network, data=data, state=state, val_m=val_m,
                  metrics=load_metrics(accelerator), output_dir=output_dir,
                  global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                  wall=earlier_seconds + time.time() - started, stopped_early=stopped_early,
                  figures=figures)


PACE_STEPS = 10  # optimiser steps timed (after the first) for the time a schedule expects


def _expect(cfg, steps_left, seconds_per_step, global_batch):
    """The time the rest of the schedule takes at the pace of its first steps (evaluations
    besides), and the flag that shortens it where that is long."""
    minutes = steps_left * seconds_per_step / 60
    logger.info(f"expected: {global_batch / seconds_per_step:.0f} img/s training here, so "
                f"about {minutes:.0f} min for the {steps_left} optimiser steps left "
                "(evaluations besides)"
                + ("; --budget IMAGES caps the images seen" if minutes > 60 and
                   hasattr(cfg, "budget") else ""))


def _image_loader(accelerator, cfg, images):
    """The val images (an ImageDataset) in batches, sharded over the processes."""
    loader = torch.utils.data.DataLoader(images, batch_size=cfg.batch_size,
                                         num_workers=num_workers(cfg, accelerator.num_processes),
                                         collate_fn=images.collate(False))
    return accelerator.prepare_data_loader(loader)


def _bar(accelerator, loader, state, total):
    return tqdm(loader, desc=f"epoch {state.epoch + 1} train", leave=False,
                initial=state.batches_done, total=total,
                disable=not progress_bars() or not accelerator.is_local_main_process)


def _train_values(totals: Totals, optimizer, state, batches_per_epoch: int) -> dict:
    """What a log point sends to the trackers: the window's mean loss, the lrs, the epoch."""
    lrs = group_lrs(optimizer)
    values = {"train/loss": totals.loss / max(totals.samples, 1),
              "train/lr": lrs["head"] if "head" in lrs else next(iter(lrs.values())),
              "train/epoch": state.epoch + state.batches_done / batches_per_epoch}
    values.update({f"train/lr_{k}": v for k, v in lrs.items() if k != "head"})
    return values


def _lr_range_test(accelerator, cfg, network, phase, model, optimizer, loader, loss_fn, mix,
                   probe, output_dir):
    """--find-lr / --lr auto: measured on the model the peak lr is chosen for: with every
    layer training when --freeze-epochs starts with the head alone (those epochs then use the
    same peak), with the frozen backbone for the extractor, and from the fresh heads that
    --finetune-from random trains from (not the probe's trained ones, in which the loss
    cannot fall). Returns the lr; with --lr auto and no suggestion, the default lr."""
    frozen = phase.frozen
    unfreeze = frozen and phase.freeze_epochs is not None
    if unfreeze:
        logger.info("LR range test with every layer training (the head-only epochs "
                    "of --freeze-epochs then use the same peak lr)")
        phase.set(bare_model(accelerator, model), False)
        model = rewrap_ddp(accelerator, model)
    probe_heads = None
    fresh = probe.fresh_heads if probe is not None else None
    if fresh is not None:  # the probe's heads are epoch 0's: put back after
        probe_heads = {k: v.detach().clone() for k, v in network.trained.state_dict().items()
                       if k in fresh}
        network.trained.load_state_dict(fresh, strict=False)
    lr = find_lr(accelerator, model, optimizer, loader, cfg, output_dir=output_dir,
                 loss_fn=loss_fn,
                 mix=mix, head_names=phase.head_names, frozen=frozen and not unfreeze,
                 bn_eval=phase.bn_eval, channels_last=network.channels_last)
    if probe_heads is not None:
        network.trained.load_state_dict(probe_heads, strict=False)
    if unfreeze:
        phase.set(bare_model(accelerator, model), True)
        rewrap_ddp(accelerator, model)  # as the prepared model was built: frozen
    if lr is None and cfg.lr == "auto":
        lr = type(cfg)(optimizer=cfg.optimizer).lr  # the script's default for this optimiser
        logger.info(f"--lr auto: no suggestion, training with the default --lr {lr:g}")
    return lr


def _restart_heads(network, probe, ema, cfg):
    """--finetune-from random: after the probe's model is evaluated (and kept as best/ if
    nothing beats it), every layer trains from the fresh heads instead. Every process holds
    the same fresh heads (built under the same seed), so DDP replicas stay equal; no
    optimiser step has been taken yet, so there is no momentum to reset. Returns the EMA,
    started anew from the weights that train."""
    module = network.trained  # the module under DDP/compile: its tensors are theirs
    result = module.load_state_dict(probe.fresh_heads, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"heads not in the model: {result.unexpected_keys}")
    return ModelEma(module, cfg.model_ema_decay) if ema is not None else None


def _announce(accelerator, cfg, network, data, state, global_batch, steps_per_epoch,
              output_dir, forked_from, schedule):
    """The run's first line (with the schedule chosen and why), the tracker's run (with the
    resolved config; `forked_from`: the tracker run of the checkpoint's own folder, when
    resumed elsewhere) and, on a fresh run, the augmentation preview."""
    n_train, n_val = len(data.train_images), len(data.val_images)
    logger.info(f"{cfg.script}: {n_train} train / {n_val} val images, "
                f"{len(data.class_names)} classes, at {network.preprocessing['input_size']} "
                f"px; {schedule}; {accelerator.num_processes} "
                f"process(es), {accelerator.mixed_precision} precision, global batch "
                f"{global_batch}, {steps_per_epoch} optimiser steps/epoch -> {output_dir}")
    config = dict(vars(cfg), lr_found=state.lr if cfg.lr == "auto" else None,
                  script=cfg.script,
                  num_processes=accelerator.num_processes,
                  mixed_precision=accelerator.mixed_precision, global_batch_size=global_batch,
                  steps_per_epoch=steps_per_epoch, train_samples=n_train, val_samples=n_val,
                  num_classes=len(data.class_names),
                  **({"forked_from_run_id": forked_from} if forked_from else {}))
    start_run(accelerator, cfg, config, output_dir, script=cfg.script,
              resume_id=state.tracker_run_id)
    state.tracker_run_id = tracker_run_id(accelerator) or state.tracker_run_id
    if accelerator.is_main_process and not cfg.resume_from_checkpoint:
        log_pictures(accelerator, {"augmentation": augmentation_preview_png(
            data.train_images, network.preprocessing, data.class_names,
            os.path.join(output_dir, "augmentation.png"))}, 0)


def _minutes(seconds):
    return f"{seconds // 60:.0f}m {seconds % 60:02.0f}s"


def _epoch_line(phase, m):
    return f"{phase} Loss: {m['loss']:.4f} Acc: {m['accuracy']:.4f}"
