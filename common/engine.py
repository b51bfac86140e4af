"""The training and evaluation loop, shared by both scripts, on an `accelerate.Accelerator`.

One batch: DataLoader (common/data.py) -> model under Accelerate's autocast -> per-sample
cross-entropy -> `accelerator.backward` inside `accelerator.accumulate` -> optimiser step ->
our LR schedule step (common/optim.py) -> per-sample losses, predictions and labels
gathered with `gather_for_metrics` (which drops the padding Accelerate adds to even out the
last batch across processes, so N images are counted exactly N times) -> metrics
(common/metrics.py) -> tracker + metrics.jsonl.

Global batch = batch-size x processes x gradient-accumulation-steps.

Resume: full-state checkpoints (common/checkpoint.py) are taken only right after an
optimiser step, so no half-accumulated gradient is ever lost. A resumed run restores model,
optimiser, schedule, RNG states and counters, re-seeds the sampler for the epoch in progress
and skips the batches already done; with augmentation seeded per sample (common/data.py) it
then computes exactly what the uninterrupted run would have.
"""

import math
import os
import signal
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.checkpoint import (TrainState, append_jsonl, export_model, read_train_state,
                               resolve_checkpoint, save_checkpoint, write_json)
from common.data import set_epoch
from common.errors import UserError
from common.metrics import compute_metrics, load_metrics
from common.lr_finder import find_lr
from common.models import freeze_backbone, set_train_mode
from common.optim import build_scheduler, set_peak_lr
from common.tracking import log_pictures, set_summary, start_run, tracker_run_id
from common.viz import augmentation_preview_png, confusion_matrix_png, prediction_grid_png


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop checks it (agreed across ranks) after each
    optimiser step, saves a checkpoint and exits. Clusters send SIGTERM before SIGKILL."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def _cat(parts):
    return [torch.cat(p) if p else torch.empty(0) for p in zip(*parts)] if parts else []


def train_one_epoch(accelerator, model, loader, optimizer, scheduler, state, run, on_step):
    """Train on `loader` (the rest of epoch `state.epoch`). After every optimiser step,
    `on_step()` may checkpoint or stop. Returns the epoch's train metrics."""
    module = accelerator.unwrap_model(model)
    model.train()
    set_train_mode(module, run["head_name"], run["frozen_backbone"])
    parts = [tuple(state.partial)] if state.partial else []  # resumed mid-epoch
    bar = tqdm(loader, desc=f"epoch {state.epoch + 1} train", leave=False,
               initial=state.batches_done, total=state.batches_done + len(loader),
               disable=not accelerator.is_local_main_process)
    for batch in bar:
        x, y = _inputs(batch, run)
        with accelerator.accumulate(model):
            logits = model(x)
            per_sample = F.cross_entropy(logits.float(), y, reduction="none",
                                         label_smoothing=run["label_smoothing"])
            loss = per_sample.mean()
            # Summed over processes: the global batch's loss for the log, a NaN on any rank
            # reaches every rank, and so does a stop request, so all ranks act together.
            total = accelerator.reduce(torch.stack([loss.detach(),
                                                    torch.tensor(float(run["stop"].signum),
                                                                 device=loss.device)]), "sum")
            global_loss = total[0].item() / accelerator.num_processes
            if not math.isfinite(global_loss):
                raise UserError(f"training loss became {global_loss} at epoch "
                                f"{state.epoch + 1}, step {state.step}; lower --lr (or train "
                                "in fp32/bf16 instead of fp16)")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        g = accelerator.gather_for_metrics((per_sample.detach(), logits.argmax(-1), y))
        parts.append(tuple(t.cpu() for t in g))
        state.batches_done += 1
        if accelerator.sync_gradients:
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used (head)
            lrs = _group_lrs(optimizer)
            scheduler.step()
            state.step += 1
            accelerator.log({"train/loss_step": global_loss, "train/lr": lr,
                             **{f"train/lr_{k}": v for k, v in lrs.items() if k != "head"},
                             "epoch": state.epoch}, step=state.step)
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.2e}")
            state.partial = _cat(parts)
            on_step(stop=total[1].item() > 0)
    losses, preds, labels = _cat(parts)
    state.partial = None
    return {"loss": losses.mean().item(), "accuracy": (preds == labels).float().mean().item(),
            "samples": len(labels)}


def _group_lrs(optimizer):
    """{group name: lr}, one entry per name (decay / no-decay halves share their lr)."""
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}


def _set_frozen(accelerator, model, run, epoch):
    """--freeze-epochs: head only before `epoch` freeze_epochs, every layer from then on.
    A frozen parameter gets no gradient, so the optimiser skips it; DDP was built with
    find_unused_parameters for this and leaves its .grad alone (common/runtime.py)."""
    frozen = epoch < run["freeze_epochs"]
    if frozen != run["frozen_backbone"]:
        freeze_backbone(accelerator.unwrap_model(model), run["head_name"], frozen)
        run["frozen_backbone"] = frozen
        accelerator.print(f"epoch {epoch + 1}: " + ("head only (backbone and its BatchNorm "
                          "statistics frozen)" if frozen else "every layer trains"))


def _inputs(batch, run):
    x = batch["pixel_values"]
    if run["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["labels"]


@torch.no_grad()
def evaluate(accelerator, model, loader, run, metrics):
    """Exact loss/accuracy/per-class metrics over the whole eval set, on every rank."""
    model.eval()
    parts = []
    for batch in tqdm(loader, desc="val", leave=False,
                      disable=not accelerator.is_local_main_process):
        x, y = _inputs(batch, run)
        with accelerator.autocast():
            logits = model(x)
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        prob, pred = logits.float().softmax(-1).max(-1)
        g = accelerator.gather_for_metrics((per_sample, pred, y, batch["index"], prob))
        parts.append(tuple(t.cpu() for t in g))
    losses, preds, labels, index, prob = _cat(parts)
    out = compute_metrics(metrics, preds, labels, run["class_names"])
    order = index.argsort()  # dataset order, whatever the process count
    out.update(loss=losses.mean().item(), samples=len(labels),
               predictions={"index": index[order].tolist(), "pred": preds[order].tolist(),
                            "label": labels[order].tolist(), "prob": prob[order].tolist()})
    return out


def _epoch_line(phase, m):
    return f"{phase} Loss: {m['loss']:.4f} Acc: {m['accuracy']:.4f}"


def _resume(accelerator, cfg, output_dir, state):
    """Load the checkpoint named by --resume-from-checkpoint into everything registered."""
    path = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
    state.load_state_dict(read_train_state(path).state_dict())  # run id before the tracker
    accelerator.load_state(path)  # model, optimiser, scheduler, RNG, sampler, `state`
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if accelerator.is_main_process and os.path.exists(metrics_path):
        # rows the interrupted run wrote after this checkpoint will be computed again
        with open(metrics_path) as fh:
            keep = [line for line in fh if line.strip()][:state.epoch]
        with open(metrics_path, "w") as fh:
            fh.writelines(keep)
    accelerator.print(f"Resuming from {path}: epoch {state.epoch + 1}, batch "
                      f"{state.batches_done}, optimiser step {state.step}")


def fit(accelerator, cfg, model, optimizer, train_loader, val_loader, run, output_dir):
    """Train for cfg.epochs, evaluating after each epoch (only the start model with
    --epochs 0); export the best model by val accuracy; checkpoint; write metrics.jsonl and
    results.json. `run` holds what the files and tracker need: script, head_name,
    frozen_backbone, class_names, preprocessing, channels_last, train_samples, val_samples.
    """
    t0 = run.get("started", time.time())  # wall time counts data loading and extraction
    if run["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # prepare moves the model to the device and wraps it in DDP; the optimiser is rewrapped
    # so that it skips steps while gradients accumulate.
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader)
    # images for the pictures (the loaders may serve cached features instead)
    run.setdefault("train_images", train_loader.dataset)
    run.setdefault("val_images", val_loader.dataset)
    run.setdefault("label_smoothing", cfg.label_smoothing)
    run.setdefault("freeze_epochs", 0)
    state = TrainState()
    if run["freeze_epochs"]:
        _set_frozen(accelerator, model, run, 0)  # a resume sets the phase again below
    if (cfg.find_lr or cfg.lr == "auto") and not cfg.resume_from_checkpoint:
        # before the schedule exists: LambdaLR takes each group's peak lr when built
        state.lr = find_lr(accelerator, model, optimizer, train_loader, run, cfg, _inputs,
                           output_dir)
        if cfg.lr != "auto":  # --find-lr alone: report and stop
            accelerator.end_training()
            return {"suggested_lr": state.lr}
        set_peak_lr(optimizer, state.lr)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    accelerator.register_for_checkpointing(state, scheduler)
    if cfg.resume_from_checkpoint:
        _resume(accelerator, cfg, output_dir, state)
    with accelerator.main_process_first():
        metrics = load_metrics()
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    accelerator.print(f"{run['script']}: {run['train_samples']} train / {run['val_samples']} val "
                      f"images, {len(run['class_names'])} classes; {accelerator.num_processes} "
                      f"process(es), {accelerator.mixed_precision} precision, global batch "
                      f"{global_batch}, {steps_per_epoch} optimiser steps/epoch -> {output_dir}")
    config = dict(vars(cfg), lr_found=state.lr, script=run["script"],
                  num_processes=accelerator.num_processes,
                  mixed_precision=accelerator.mixed_precision, global_batch_size=global_batch,
                  steps_per_epoch=steps_per_epoch, train_samples=run["train_samples"],
                  val_samples=run["val_samples"], num_classes=len(run["class_names"]))
    start_run(accelerator, cfg, config, output_dir, run, state.tracker_run_id)
    state.tracker_run_id = tracker_run_id(accelerator) or state.tracker_run_id
    if accelerator.is_main_process and not cfg.resume_from_checkpoint:
        log_pictures(accelerator, {"augmentation": augmentation_preview_png(
            run["train_images"], run, os.path.join(output_dir, "augmentation.png"))}, 0)
    run["stop"] = StopSignal()

    earlier_seconds = state.wall_seconds  # of the sessions before a resume

    def checkpoint(reason=""):
        if cfg.checkpointing_steps == "no" and not reason:
            return None
        state.wall_seconds = earlier_seconds + time.time() - t0
        return save_checkpoint(accelerator, output_dir, state, cfg.checkpoints_total_limit)

    def on_step(stop):
        every = cfg.checkpointing_steps
        if stop:
            path = checkpoint("stop")
            name = signal.Signals(run["stop"].signum).name if run["stop"].signum else "a signal"
            accelerator.print(f"Stopped by {name}: saved {path}; continue with "
                              f"--resume-from-checkpoint latest --output-dir {output_dir}")
            accelerator.end_training()
            raise SystemExit(128 + (run["stop"].signum or signal.SIGTERM))
        if every.isdigit() and state.step % int(every) == 0:
            checkpoint()

    val_m = None
    while state.epoch < max(cfg.epochs, 1):
        epoch_t0 = time.time()
        row = {"epoch": state.epoch + 1 if cfg.epochs else 0}
        if cfg.epochs:
            if run["freeze_epochs"]:
                _set_frozen(accelerator, model, run, state.epoch)
            set_epoch(train_loader, state.epoch)
            loader = (accelerator.skip_first_batches(train_loader, state.batches_done)
                      if state.batches_done else train_loader)
            train_t0 = time.time()
            train_m = train_one_epoch(accelerator, model, loader, optimizer, scheduler, state,
                                      run, on_step)
            # images/s of the whole loop (loading, forward, backward, step, gathers): what
            # benchmarks/loader_vs_model.py compares with the bare model
            train_m["seconds"] = time.time() - train_t0
            row.update({f"train_{k}": v for k, v in train_m.items()})
            accelerator.print(f"Epoch {state.epoch + 1}/{cfg.epochs}\n"
                              f"{_epoch_line('train', train_m)}")
        val_m = evaluate(accelerator, model, val_loader, run, metrics)
        accelerator.print(_epoch_line("val", val_m))
        row.update({f"val_{k}": v for k, v in val_m.items()
                    if k not in ("confusion_matrix", "predictions")},
                   lr=optimizer.param_groups[0]["lr"], lr_groups=_group_lrs(optimizer),
                   seconds=time.time() - epoch_t0)
        accelerator.log({**{k.replace("_", "/", 1): v for k, v in row.items()
                            if isinstance(v, (int, float))},
                         **{f"val/{m}/{c}": v for c, d in val_m["per_class"].items()
                            for m, v in d.items()}}, step=state.step)
        if state.best is None or val_m["accuracy"] > state.best["val_accuracy"]:
            state.best = {"epoch": row["epoch"], "val_accuracy": val_m["accuracy"],
                          "val_loss": val_m["loss"], "val_macro_f1": val_m["macro_f1"],
                          "val_per_class": val_m["per_class"],
                          "confusion_matrix": val_m["confusion_matrix"],
                          "predictions": val_m["predictions"]}
            if accelerator.is_main_process:
                # the cached-feature path trains the head alone: export backbone + head
                export_model(run.get("export_model") or accelerator.unwrap_model(model),
                             os.path.join(output_dir, "best"),
                             dict(model=cfg.model, class_names=run["class_names"],
                                  head=run["head_name"], preprocessing=run["preprocessing"],
                                  epoch=row["epoch"], val_accuracy=val_m["accuracy"]))
        if accelerator.is_main_process:
            append_jsonl(os.path.join(output_dir, "metrics.jsonl"), row)
        state.epoch, state.batches_done = state.epoch + 1, 0
        if cfg.epochs and cfg.checkpointing_steps == "epoch":
            checkpoint()
    if val_m is None:  # resumed from a checkpoint taken after the last epoch
        val_m = evaluate(accelerator, model, val_loader, run, metrics)
    return _finish(accelerator, cfg, run, state, val_m, global_batch, steps_per_epoch,
                   earlier_seconds + time.time() - t0, output_dir)


def _finish(accelerator, cfg, run, state, val_m, global_batch, steps_per_epoch, wall,
            output_dir):
    best = state.best
    results = dict(
        script=run["script"], model=cfg.model, best_val_accuracy=best["val_accuracy"],
        best_val_loss=best["val_loss"], best_val_macro_f1=best["val_macro_f1"],
        best_epoch=best["epoch"], epochs=cfg.epochs, train_samples=run["train_samples"],
        val_samples=val_m["samples"], num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision, global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch, optimizer_steps=state.step,
        wall_seconds=round(wall, 2), lr=state.lr or cfg.lr, final_val_accuracy=val_m["accuracy"],
        final_val_loss=val_m["loss"], class_names=run["class_names"],
        best_val_per_class=best["val_per_class"], best_confusion_matrix=best["confusion_matrix"])
    set_summary(accelerator, {k: results[k] for k in ("best_val_accuracy", "best_val_loss",
                                                      "best_val_macro_f1", "best_epoch")})
    if accelerator.is_main_process:
        write_json(os.path.join(output_dir, "results.json"), results)
        log_pictures(accelerator, {
            "confusion_matrix": confusion_matrix_png(
                best["confusion_matrix"], run["class_names"],
                os.path.join(output_dir, "confusion_matrix.png"),
                f"Best epoch {best['epoch']} on val")},
            state.step)
        log_pictures(accelerator, {"predictions": prediction_grid_png(
            run["val_images"], best["predictions"], run,
            os.path.join(output_dir, "predictions.png"))}, state.step)
    accelerator.print(f"Training complete in {wall // 60:.0f}m {wall % 60:.0f}s\n"
                      f"Best val Acc: {best['val_accuracy']:.4f} (epoch {best['epoch']}) "
                      f"-> {output_dir}")
    accelerator.end_training()
    return results
