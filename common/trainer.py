"""`fit`: epochs of training and evaluation around common/engine.py, with the freeze ->
unfreeze phases, the LR range test, checkpoints and resume, logging and the run files.

Order (each step a helper below): read the checkpoint to resume (before `prepare`, because
the phase it is in decides how DDP is built) -> prepare model, optimiser and loaders ->
LR range test (fresh runs with --find-lr / --lr auto) -> schedule -> apply the checkpoint ->
start the tracker -> epochs: phase, train, evaluate, export the best, metrics row, checkpoint
-> results.json and pictures.

Resume: checkpoints (common/checkpoint.py) are taken only right after an optimiser step, so
no half-accumulated gradient is ever lost. A resumed run restores model, optimiser, RNG
states, counters and the epoch's running sums, re-seeds the sampler for the epoch in progress
and skips the batches already done; with augmentation seeded per sample (common/data.py) it
then computes exactly what the uninterrupted run would have. On another number of processes
(or batch size) the progress is converted, when the samples already seen make a whole number
of the new global batches; otherwise the run refuses, naming an epoch-end checkpoint.
"""

import dataclasses
import math
import os
import resource
import signal
import time

import torch

from common.checkpoint import (TrainState, apply_checkpoint, load_checkpoint, restore_best,
                               restore_rng, save_checkpoint, set_aside_later_checkpoints)
from common.data import set_epoch
from common.engine import (StopSignal, check_finite, evaluate, last_batch_remainder,
                           reduce_sums, train_one_epoch)
from common.errors import UserError
from common.calibration import expected_calibration_error, fit_temperature
from common.card import model_card
from common.export import export_model, load_predictions, update_export
from common.files import append_jsonl, read_jsonl, write_json, write_jsonl
from common.ema import ModelEma
from common.lr_finder import find_lr
from common.metrics import compute_metrics, load_metrics, score, wilson_interval
from common.models import freeze_backbone, set_train_mode
from common.optim import build_scheduler, group_lrs, position_scheduler, set_peak_lr
from common.runtime import bare_model, rewrap_ddp, seed_for_training
from common.tracking import log_metrics, log_pictures, set_summary, start_run, tracker_run_id
from common.viz import (augmentation_preview_png, confusion_matrix_png, prediction_grid_png,
                        top_losses_png)


def fit(accelerator, cfg, run, optimizer, train_loader, val_loader, output_dir):
    """Train `run.trained` for cfg.epochs, evaluating after each epoch (only the start model
    with --epochs 0); export the best model by val accuracy; checkpoint; write metrics.jsonl
    and results.json. Returns the results dict.

    Raises UserError: a checkpoint that cannot be read or does not fit this world, a
    non-finite training loss, a diverging LR range test."""
    ckpt = _read_resume(accelerator, cfg, output_dir)
    state = ckpt.state if ckpt else TrainState()
    frozen = run.frozen_at(state.epoch)
    freeze_backbone(run.trained, run.head_names, frozen)  # before DDP is built around it
    model = run.trained.to(memory_format=torch.channels_last) if run.channels_last \
        else run.trained
    # prepare moves the model to the device and wraps it in DDP; the optimiser is rewrapped
    # so that it skips steps while gradients accumulate; the loaders are sharded and their
    # batches moved to the device
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader)
    if cfg.compile:  # after DDP: torch.compile wraps the DDP module (rewrap_ddp keeps it so)
        model = torch.compile(model)
    if not ckpt and (cfg.find_lr or cfg.lr == "auto"):
        state.lr = _lr_range_test(accelerator, cfg, run, model, optimizer, train_loader,
                                  frozen, output_dir)
        if cfg.find_lr and cfg.lr != "auto":  # --find-lr alone: report and stop
            accelerator.end_training()
            return {"suggested_lr": state.lr}
    if state.lr:
        set_peak_lr(optimizer, state.lr)  # before the schedule: it takes the peaks as built
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    if cfg.epochs == "auto":  # a budget of optimiser steps, whatever the size of the data
        cfg = dataclasses.replace(cfg, epochs=max(1, math.ceil(cfg.budget_steps /
                                                               steps_per_epoch)))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    ema = ModelEma(bare_model(accelerator, model), cfg.model_ema_decay) if cfg.model_ema \
        else None
    if ckpt:
        _apply_resume(accelerator, cfg, ckpt, model, optimizer, scheduler, len(train_loader),
                      steps_per_epoch, output_dir)
        if ema is not None and "ema" in ckpt.extra:
            ema.load_state_dict(ckpt.extra["ema"], ckpt.state.ema_updates)
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    _announce(accelerator, cfg, run, state, global_batch, steps_per_epoch, output_dir)
    # last, after everything that might draw random numbers: each rank's own stream
    if ckpt:
        restore_rng(accelerator, ckpt, cfg.seed)
        del ckpt  # applied: its tensors (a model and optimiser's worth) are not held all run
    else:
        seed_for_training(accelerator, cfg.seed)

    loop = _Loop(accelerator, cfg, run, state, model, optimizer, scheduler, train_loader,
                 val_loader, output_dir, frozen, ema)
    try:
        val_m = loop.run_epochs()
    finally:  # a notebook's next run (or its Ctrl-C) gets the handlers it had before
        loop.stop.restore()
    wall = loop.earlier_seconds + time.time() - run.started
    run.extra_results = dict(run.extra_results or {},
                             first_step_seconds=loop.first_step_seconds,
                             peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                               / 1024, 1))  # of the main process
    return _finish(accelerator, cfg, run, state, val_m, global_batch, steps_per_epoch, wall,
                   output_dir, loop.stopped_early, loop.metrics)


def _read_resume(accelerator, cfg, output_dir):
    """The checkpoint named by --resume-from-checkpoint, read and checked (not applied)."""
    if not cfg.resume_from_checkpoint:
        return None
    return load_checkpoint(cfg.resume_from_checkpoint, output_dir, accelerator.print,
                           keep_best=accelerator.is_main_process)  # only it restores best/


def _set_phase(accelerator, model, run, frozen):
    """Freeze or unfreeze the backbone of the prepared `model` (DDP is built again so that it
    registers exactly the trainable parameters)."""
    freeze_backbone(bare_model(accelerator, model), run.head_names, frozen)
    return rewrap_ddp(accelerator, model)


def _lr_range_test(accelerator, cfg, run, model, optimizer, loader, frozen, output_dir):
    """--find-lr / --lr auto: measured on the model the peak lr is chosen for: with every
    layer training when --freeze-epochs starts with the head alone (those epochs then use the
    same peak), with the frozen backbone for the extractor, and from the fresh heads that
    --finetune-from random trains from (not the probe's trained ones, in which the loss
    cannot fall). Returns the lr; with --lr auto and no suggestion, the default lr."""
    unfreeze = frozen and run.freeze_epochs is not None
    if unfreeze:
        accelerator.print("LR range test with every layer training (the head-only epochs "
                          "of --freeze-epochs then use the same peak lr)")
        model = _set_phase(accelerator, model, run, False)
    probe_heads = None
    if run.restart_heads is not None:  # the probe's heads are epoch 0's: put back after
        probe_heads = {k: v.detach().clone() for k, v in run.trained.state_dict().items()
                       if k in run.restart_heads}
        run.trained.load_state_dict(run.restart_heads, strict=False)
    lr = find_lr(accelerator, model, optimizer, loader, run, cfg, output_dir,
                 frozen and not unfreeze)
    if probe_heads is not None:
        run.trained.load_state_dict(probe_heads, strict=False)
    if unfreeze:
        _set_phase(accelerator, model, run, True)
    if lr is None and cfg.lr == "auto":
        lr = type(cfg)(optimizer=cfg.optimizer).lr  # the script's default for this optimiser
        accelerator.print(f"--lr auto: no suggestion, training with the default --lr {lr:g}")
    return lr


def _convert_progress(accelerator, cfg, state, loader_len, steps_per_epoch):
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
    accelerator.print(f"resuming a checkpoint of {saved[0]} process(es) x batch {saved[1]} on "
                      f"{world[0]} x {world[1]}: epoch {state.epoch + 1}, batch "
                      f"{state.batches_done}/{loader_len}, optimiser step {state.step} (same "
                      "images seen; not bit-identical to an uninterrupted run)")


def _apply_resume(accelerator, cfg, ckpt, model, optimizer, scheduler, loader_len,
                  steps_per_epoch, output_dir):
    state = ckpt.state
    _convert_progress(accelerator, cfg, state, loader_len, steps_per_epoch)
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
                accelerator.print(f"{metrics_path}: its last line was cut off by the crash; "
                                  "dropped (that row is computed again)")
            write_jsonl(metrics_path, [r for r in rows if r["epoch"] <= state.epoch])
    accelerator.wait_for_everyone()
    accelerator.print(f"Resuming from {ckpt.path}: epoch {state.epoch + 1}, batch "
                      f"{state.batches_done}, optimiser step {state.step}")


def _announce(accelerator, cfg, run, state, global_batch, steps_per_epoch, output_dir):
    n_train, n_val = len(run.train_images), len(run.val_images)
    accelerator.print(f"{run.script}: {n_train} train / {n_val} val images, "
                      f"{len(run.class_names)} classes; {accelerator.num_processes} "
                      f"process(es), {accelerator.mixed_precision} precision, global batch "
                      f"{global_batch}, {steps_per_epoch} optimiser steps/epoch -> {output_dir}")
    config = dict(vars(cfg), lr_found=state.lr, script=run.script,
                  num_processes=accelerator.num_processes,
                  mixed_precision=accelerator.mixed_precision, global_batch_size=global_batch,
                  steps_per_epoch=steps_per_epoch, train_samples=n_train, val_samples=n_val,
                  num_classes=len(run.class_names))
    start_run(accelerator, cfg, config, output_dir, run.script, state.tracker_run_id)
    state.tracker_run_id = tracker_run_id(accelerator) or state.tracker_run_id
    if accelerator.is_main_process and not cfg.resume_from_checkpoint:
        log_pictures(accelerator, {"augmentation": augmentation_preview_png(
            run.train_images, run, os.path.join(output_dir, "augmentation.png"))}, 0)


class _Loop:
    """The epoch loop and its per-step hook (log, checkpoint, stop)."""

    def __init__(self, accelerator, cfg, run, state, model, optimizer, scheduler,
                 train_loader, val_loader, output_dir, frozen, ema):
        self.accelerator, self.cfg, self.run, self.state = accelerator, cfg, run, state
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.train_loader, self.val_loader = train_loader, val_loader
        self.output_dir, self.frozen, self._metric_modules = output_dir, frozen, None
        self.ema, self.stopped_early, self.first_step_seconds = ema, None, None
        self.stop = StopSignal()  # handlers of this run only: fit() puts the old ones back
        self.saved_at, self.saved_path = None, None  # the last checkpoint this run wrote
        self.earlier_seconds = state.wall_seconds  # of the sessions before a resume

    def run_epochs(self):
        cfg, state = self.cfg, self.state
        val_m = None
        if self.run.evaluate_start and cfg.epochs and state.best is None and \
                state.epoch == 0 and state.batches_done == 0:
            val_m = self._evaluate({"epoch": 0}, time.time())  # the probe's model: a candidate
            if self.run.restart_heads is not None:
                self._restart_heads()
        while state.epoch < max(cfg.epochs, 1):
            if self._out_of_steps():  # a time box resumed with the same --max-train-steps
                break
            stopping, val_m = self._epoch()
            if stopping:
                self._stop()
            if self._out_of_steps():
                self.accelerator.print(f"--max-train-steps {cfg.max_train_steps}: done")
                break
            if cfg.patience and cfg.epochs and state.epoch - state.best["epoch"] >= cfg.patience:
                self.stopped_early = state.epoch
                self.accelerator.print(
                    f"early stop after epoch {state.epoch}: val {cfg.select_metric} not better "
                    f"than epoch {state.best['epoch']}'s for {cfg.patience} epochs (--patience)")
                break
        if val_m is None:  # resumed from a checkpoint taken after the last epoch
            val_m = evaluate(self.accelerator, self.model, self.val_loader, self.run,
                             self.metrics)
        return val_m

    def _epoch(self):
        accelerator, cfg, state, run = self.accelerator, self.cfg, self.state, self.run
        epoch_t0 = time.time()
        row = {"epoch": state.epoch + 1 if cfg.epochs else 0}
        stopping = partial = False
        if cfg.epochs:
            self._phase()
            set_epoch(self.train_loader, state.epoch)
            loader = self.train_loader
            if state.batches_done:  # resumed mid-epoch
                loader = (loader.skip(state.batches_done) if hasattr(loader, "skip")
                          else accelerator.skip_first_batches(loader, state.batches_done))
            train_t0 = time.time()
            (loss, correct, n), stopping = train_one_epoch(
                accelerator, self.model, loader, self.optimizer, self.scheduler, state, run,
                self.stop, self._on_step,
                # of the whole epoch's loader, not of a resumed (skipping) one
                last_batch_remainder(self.train_loader, accelerator.num_processes))
            # --max-train-steps can end the epoch early: its position is kept (a resumed
            # time box trains the rest of this epoch), its row says it is partial, and its
            # checkpoint is taken before the evaluation, like a mid-epoch one, so that the
            # resumed run is the uninterrupted one
            partial = state.batches_done < len(self.train_loader)
            # images/s of the whole loop (loading, forward, backward, step): what
            # benchmarks/loader_vs_model.py compares with the bare model
            train_m = dict(loss=loss / max(n, 1), accuracy=correct / max(n, 1),
                           samples=int(n), seconds=time.time() - train_t0)
            row.update({f"train_{k}": v for k, v in train_m.items()})
            accelerator.print(f"Epoch {state.epoch + 1}/{cfg.epochs}"
                              + (f" (partial: batch {state.batches_done}/"
                                 f"{len(self.train_loader)})" if partial else "")
                              + f"\n{_epoch_line('train', train_m)}")
            if partial:
                row["partial"] = True
                state.train_sums = [loss, correct, n]  # over all processes, as saved
                if cfg.checkpointing_steps != "no":
                    self._checkpoint()
        val_m = self._evaluate(row, epoch_t0)
        if cfg.epochs and partial:
            return stopping, val_m
        state.epoch, state.batches_done, state.train_sums = state.epoch + 1, 0, [0.0] * 3
        if cfg.epochs and (cfg.checkpointing_steps == "epoch" or stopping):
            self._checkpoint()
        return stopping, val_m

    def _evaluate(self, row, t0):
        """Val metrics of the model (and its EMA), the metrics row, the best so far."""
        accelerator, cfg, run = self.accelerator, self.cfg, self.run
        val_m = evaluate(accelerator, self.model, self.val_loader, run, self.metrics)
        accelerator.print(_epoch_line("val", val_m))
        candidates = [("model", val_m)]
        if self.ema is not None and row["epoch"] > 0:
            self.ema.sync(accelerator)  # every rank scores (and may keep) rank 0's average
            ema_m = evaluate(accelerator, self.ema.module, self.val_loader, run, self.metrics)
            accelerator.print(_epoch_line("val (EMA)", ema_m))
            candidates.append(("ema", ema_m))
            row.update({f"ema_val_{k}": ema_m[k] for k in ("accuracy", "loss", "macro_f1")})
        row.update({f"val_{k}": v for k, v in val_m.items()
                    if k not in ("confusion_matrix", "predictions")},
                   lr=self.optimizer.param_groups[0]["lr"],
                   lr_groups=group_lrs(self.optimizer), seconds=time.time() - t0)
        self._log({**{k.replace("_", "/", 1): v for k, v in row.items()
                      if isinstance(v, (int, float)) and k != "lr"},
                   "train/lr": row["lr"],
                   **{f"train/lr_{k}": v for k, v in row["lr_groups"].items() if k != "head"},
                   **{f"val/{m}/{c}": v for c, d in val_m["per_class"].items()
                      for m, v in d.items()}})
        source, best_m = max(candidates, key=lambda c: score(c[1], cfg.select_metric))
        self._keep_if_best(row, best_m, source)
        if accelerator.is_main_process:
            append_jsonl(os.path.join(self.output_dir, "metrics.jsonl"), row)
        return val_m

    @property
    def metrics(self):
        """The `evaluate` modules, loaded at the first evaluation (not before training)."""
        if self._metric_modules is None:
            with self.accelerator.main_process_first():  # one process fills the HF cache
                self._metric_modules = load_metrics()
        return self._metric_modules

    def _phase(self):
        """Freeze or unfreeze for this epoch, and put the model in train mode (a frozen
        backbone in eval mode: its BatchNorm statistics and dropout stay as pretrained)."""
        frozen = self.run.frozen_at(self.state.epoch)
        if frozen != self.frozen:
            self.model = _set_phase(self.accelerator, self.model, self.run, frozen)
            self.frozen = frozen
        set_train_mode(bare_model(self.accelerator, self.model), self.run.head_names, frozen,
                       self.run.bn_eval)
        if self.run.freeze_epochs:
            self.accelerator.print(f"epoch {self.state.epoch + 1}: " + (
                "head only (backbone and its BatchNorm statistics frozen)" if frozen
                else "every layer trains"))
        self.run_frozen = frozen

    def _on_step(self, window, epoch_sums, bar):
        """After each optimiser step: at log points and checkpoints, one reduce of the sums
        since the last log point (and the stop flag)."""
        cfg, state = self.cfg, self.state
        if self.first_step_seconds is None:  # start-up cost, from the script's first line
            self.first_step_seconds = round(time.time() - self.run.started, 2)
        if self.ema is not None and not self.accelerator.optimizer_step_was_skipped:
            self.ema.update(bare_model(self.accelerator, self.model))
        every = cfg.checkpointing_steps
        due = every.isdigit() and state.step % int(every) == 0
        if state.step % cfg.log_every and not due:
            return self._out_of_steps()
        totals, stopping = reduce_sums(self.accelerator, window, self.stop)
        window.reset()
        check_finite(totals, state)  # never checkpoint a diverged model
        lrs = group_lrs(self.optimizer)
        values = {"train/loss": totals[0] / max(totals[2], 1), "train/lr": lrs["head"]
                  if "head" in lrs else next(iter(lrs.values())),
                  "train/epoch": state.epoch + state.batches_done / len(self.train_loader)}
        values.update({f"train/lr_{k}": v for k, v in lrs.items() if k != "head"})
        self._log(values)
        bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
        if due or stopping:
            state.train_sums = reduce_sums(self.accelerator, epoch_sums, self.stop)[0]
            self._checkpoint()
        if stopping:
            self._stop()
        return self._out_of_steps()

    def _restart_heads(self):
        """--finetune-from random: after the probe's model is evaluated (and kept as best/ if
        nothing beats it), every layer trains from the fresh heads instead. Every process
        holds the same fresh heads (built under the same seed), so DDP replicas stay equal;
        no optimiser step has been taken yet, so there is no momentum to reset."""
        module = self.run.trained  # the module under DDP/compile: its tensors are theirs
        result = module.load_state_dict(self.run.restart_heads, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"heads not in the model: {result.unexpected_keys}")
        if self.ema is not None:  # the average starts from the weights that train
            self.ema = ModelEma(module, self.cfg.model_ema_decay)

    def _out_of_steps(self):
        return bool(self.cfg.max_train_steps) and self.state.step >= self.cfg.max_train_steps

    def _log(self, values):
        log_metrics(self.accelerator, {**values, "train/step": self.state.step},
                    self.state.step)

    def _keep_if_best(self, row, val_m, source):
        """Remember (and export) the model if its --select-metric beats the best so far.
        `source`: "model", or "ema" when the moving average scored better this epoch."""
        state, accelerator = self.state, self.accelerator
        new_score = score(val_m, self.cfg.select_metric)
        if state.best is not None and new_score <= state.best["score"]:
            return
        # scalars only: the train state goes into every checkpoint, on every process; the
        # predictions per image (50k x 1000 logits is ~1 GB as JSON) go to best/ below
        state.best = {"epoch": row["epoch"], "score": new_score, "source": source,
                      "val_accuracy": val_m["accuracy"], "val_loss": val_m["loss"],
                      "val_macro_f1": val_m["macro_f1"],
                      "val_balanced_accuracy": val_m["balanced_accuracy"]}
        if accelerator.is_main_process:
            module = self.ema.module if source == "ema" else \
                bare_model(accelerator, self.model)
            export_model(self._export_state(module), os.path.join(self.output_dir, "best"),
                         dict(model=self.cfg.model, class_names=self.run.class_names,
                              heads=list(self.run.model_heads),
                              preprocessing=self.run.preprocessing, epoch=row["epoch"],
                              weights=source, val_accuracy=val_m["accuracy"],
                              val_samples=val_m["samples"]), model=self.run.export,
                         predictions=val_m["predictions"])

    def _export_state(self, module):
        """The whole network's state with `module` (the trained module or its EMA) in it."""
        state = module.state_dict()
        if self.run.trained is self.run.export:
            return state
        full = self.run.export.state_dict()  # cached features: `module` is FeatureHeads
        for k, v in state.items():  # heads.<i>.<rest> -> <name of head i>.<rest>
            _, i, rest = k.split(".", 2)
            full[f"{self.run.model_heads[int(i)]}.{rest}"] = v
        return full

    def _checkpoint(self):
        state = self.state
        if self.saved_at == (state.step, state.epoch, state.batches_done):
            return self.saved_path  # a step checkpoint and the epoch's end (or a stop) coincide
        state.wall_seconds = self.earlier_seconds + time.time() - self.run.started
        state.num_processes = self.accelerator.num_processes
        state.batch_size = self.cfg.batch_size
        state.gradient_accumulation_steps = self.cfg.gradient_accumulation_steps
        if self.ema is not None:
            self.ema.sync(self.accelerator)
            state.ema_updates = self.ema.updates
        self.saved_path = save_checkpoint(
            self.accelerator, self.output_dir, state, self.model, self.optimizer,
            self.cfg.checkpoints_total_limit, {"ema": self.ema.state_dict()} if self.ema else None)
        self.saved_at = (state.step, state.epoch, state.batches_done)
        return self.saved_path

    def _stop(self):
        path = self._checkpoint()
        signum = self.stop.signum or signal.SIGTERM
        self.accelerator.print(f"Stopped by {signal.Signals(signum).name}: saved {path}; "
                               f"continue with --resume-from-checkpoint latest --output-dir "
                               f"{self.output_dir}")
        self.accelerator.end_training()
        raise SystemExit(128 + signum)


def _epoch_line(phase, m):
    return f"{phase} Loss: {m['loss']:.4f} Acc: {m['accuracy']:.4f}"


def _best_predictions(best, output_dir, metrics, class_names):
    """Main process: the best model's val predictions (lists by name) from best/, and its
    per-class figures and confusion matrix computed from them. A checkpoint written before
    they moved to best/ carries them in its train state."""
    loaded = load_predictions(os.path.join(output_dir, "best"))
    if loaded is None and "predictions" in best:
        loaded = {k: torch.as_tensor(v) for k, v in best["predictions"].items()}
    m = compute_metrics(metrics, loaded["pred"], loaded["label"], class_names)
    return {k: v.tolist() for k, v in loaded.items()}, m["per_class"], m["confusion_matrix"]


def _finish(accelerator, cfg, run, state, val_m, global_batch, steps_per_epoch, wall,
            output_dir, stopped_early, metrics):
    best = state.best
    n_val = val_m["samples"]
    predictions = per_class = confusion = None  # read from best/ by the main process only
    if accelerator.is_main_process:
        predictions, per_class, confusion = _best_predictions(best, output_dir, metrics,
                                                              run.class_names)
    low, high = wilson_interval(round(best["val_accuracy"] * n_val), n_val)
    results = dict(
        script=run.script, model=cfg.model, best_val_accuracy=best["val_accuracy"],
        best_val_accuracy_ci95=[low, high], best_val_loss=best["val_loss"],
        best_val_macro_f1=best["val_macro_f1"],
        best_val_balanced_accuracy=best["val_balanced_accuracy"], best_epoch=best["epoch"],
        best_weights=best["source"], select_metric=cfg.select_metric, epochs=cfg.epochs,
        stopped_early_after_epoch=stopped_early,
        train_samples=len(run.train_images), val_samples=n_val,
        num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
        global_batch_size=global_batch, steps_per_epoch=steps_per_epoch,
        optimizer_steps=state.step, wall_seconds=round(wall, 2), lr=state.lr or cfg.lr,
        final_val_accuracy=val_m["accuracy"], final_val_loss=val_m["loss"],
        class_names=run.class_names, best_val_per_class=per_class,
        best_confusion_matrix=confusion, **(run.extra_results or {}))
    set_summary(accelerator, {k: results[k] for k in ("best_val_accuracy", "best_val_loss",
                                                      "best_val_macro_f1", "best_epoch")})
    if accelerator.is_main_process:
        _calibrate(predictions, results)
        write_json(os.path.join(output_dir, "results.json"), results)
        pictures = {
            "confusion_matrix": confusion_matrix_png(
                confusion, run.class_names,
                os.path.join(output_dir, "confusion_matrix.png"),
                f"Best epoch {best['epoch']} on val"),
            "predictions": prediction_grid_png(run.val_images, predictions, run,
                                               os.path.join(output_dir, "predictions.png")),
            "top_losses": top_losses_png(run.val_images, predictions, run,
                                         os.path.join(output_dir, "top_losses.png"))}
        log_pictures(accelerator, {k: v for k, v in pictures.items() if v}, state.step)
        _finish_export(cfg, run, results, os.path.join(output_dir, "best"),
                       pictures["confusion_matrix"])
    accelerator.print(f"Training complete in {wall // 60:.0f}m {wall % 60:.0f}s\n"
                      f"Best val Acc: {best['val_accuracy']:.4f} (95% CI {low:.3f}-{high:.3f}, "
                      f"{n_val} images; epoch {best['epoch']}) -> {output_dir}")
    accelerator.end_training()
    return results


def _calibrate(predictions, results):
    """Temperature scaling of the best model on its val logits (common/calibration.py)."""
    logits, labels = predictions["logits"], predictions["label"]
    t = fit_temperature(logits, labels)
    results.update(temperature=round(t, 4),
                   val_ece=round(expected_calibration_error(logits, labels), 4),
                   val_ece_calibrated=round(expected_calibration_error(logits, labels, t), 4))


def _finish_export(cfg, run, results, best_dir, confusion_png):
    """best/: the temperature in model.json, the model card and its picture."""
    with open(confusion_png, "rb") as fh:
        picture = fh.read()
    timm_arch = getattr(run.export, "pretrained_cfg", {}).get("architecture")
    card = model_card(cfg, results, timm_arch, {"confusion_matrix.png"})
    update_export(best_dir, meta=dict(temperature=results["temperature"]),
                  files={"confusion_matrix.png": picture, "README.md": card})
