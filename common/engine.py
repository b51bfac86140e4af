"""The training and evaluation loop, shared by both scripts, on an `accelerate.Accelerator`.

One batch: DataLoader (common/data.py) -> model under Accelerate's autocast -> per-sample
cross-entropy -> `accelerator.backward` inside `accelerator.accumulate` -> optimiser step ->
our LR schedule step (common/optim.py) -> per-sample losses, predictions and labels
gathered with `gather_for_metrics` (which drops the padding Accelerate adds to even out the
last batch across processes, so N images are counted exactly N times) -> metrics
(common/metrics.py) -> tracker + metrics.jsonl.

Global batch = batch-size x processes x gradient-accumulation-steps.
"""

import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.errors import UserError
from common.checkpoint import append_jsonl, export_model, write_json
from common.metrics import compute_metrics, load_metrics
from common.models import set_train_mode
from common.optim import build_scheduler
from common.tracking import set_summary, start_run


def _to_device(batch, accelerator, channels_last):
    x = batch["pixel_values"]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["labels"]


def train_one_epoch(accelerator, model, loader, optimizer, scheduler, epoch, step, run):
    """One pass over `loader`. Returns (metrics dict, global optimiser step count)."""
    module = accelerator.unwrap_model(model)
    model.train()
    set_train_mode(module, run["head_name"], run["frozen_backbone"])
    losses, preds, labels = [], [], []
    bar = tqdm(loader, desc=f"epoch {epoch + 1} train", leave=False,
               disable=not accelerator.is_local_main_process)
    for batch in bar:
        x, y = _to_device(batch, accelerator, run["channels_last"])
        with accelerator.accumulate(model):
            logits = model(x)
            per_sample = F.cross_entropy(logits.float(), y, reduction="none")
            loss = per_sample.mean()
            # Mean over processes: the global batch's loss for the log, and a NaN on any
            # rank reaches every rank, so all stop together instead of one hanging.
            global_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            if not math.isfinite(global_loss):
                raise UserError(f"training loss became {global_loss} at epoch {epoch + 1}, "
                                f"step {step}; lower --lr (or train in fp32/bf16 instead of fp16)")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            lr = optimizer.param_groups[0]["lr"]  # the lr this step used
            scheduler.step()
            step += 1
            accelerator.log({"train/loss_step": global_loss, "train/lr": lr, "epoch": epoch},
                            step=step)
            bar.set_postfix(loss=f"{global_loss:.4f}", lr=f"{lr:.2e}")
        g_loss, g_pred, g_y = accelerator.gather_for_metrics(
            (per_sample.detach(), logits.argmax(-1), y))
        losses.append(g_loss.cpu())
        preds.append(g_pred.cpu())
        labels.append(g_y.cpu())
    losses, preds, labels = torch.cat(losses), torch.cat(preds), torch.cat(labels)
    return {"loss": losses.mean().item(), "accuracy": (preds == labels).float().mean().item(),
            "samples": len(labels)}, step


@torch.no_grad()
def evaluate(accelerator, model, loader, run, metrics):
    """Exact loss/accuracy/per-class metrics over the whole eval set, on every rank."""
    model.eval()
    losses, preds, labels = [], [], []
    for batch in tqdm(loader, desc="val", leave=False,
                      disable=not accelerator.is_local_main_process):
        x, y = _to_device(batch, accelerator, run["channels_last"])
        with accelerator.autocast():
            logits = model(x)
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        g_loss, g_pred, g_y = accelerator.gather_for_metrics((per_sample, logits.argmax(-1), y))
        losses.append(g_loss.cpu())
        preds.append(g_pred.cpu())
        labels.append(g_y.cpu())
    losses, preds, labels = torch.cat(losses), torch.cat(preds), torch.cat(labels)
    out = compute_metrics(metrics, preds, labels, run["class_names"])
    out.update(loss=losses.mean().item(), samples=len(labels))
    return out


def _epoch_line(phase, m):
    return f"{phase} Loss: {m['loss']:.4f} Acc: {m['accuracy']:.4f}"


def fit(accelerator, cfg, model, optimizer, train_loader, val_loader, run, output_dir):
    """Train for cfg.epochs, evaluating after each epoch (and the start model when
    --epochs 0); export the best model by val accuracy; write metrics.jsonl/results.json.

    `run` holds what the files and tracker need: script, head_name, frozen_backbone,
    class_names, preprocessing, channels_last, train_samples, val_samples.
    """
    t0 = time.time()
    if run["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # The model must be prepared before the optimiser steps: prepare moves it to the device
    # and wraps it in DDP; the optimiser keeps pointing at the same parameters.
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    with accelerator.main_process_first():
        metrics = load_metrics()
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.gradient_accumulation_steps
    accelerator.print(f"{run['script']}: {run['train_samples']} train / {run['val_samples']} val "
                      f"images, {len(run['class_names'])} classes; {accelerator.num_processes} "
                      f"process(es), {accelerator.mixed_precision} precision, global batch "
                      f"{global_batch}, {steps_per_epoch} optimiser steps/epoch -> {output_dir}")
    config = dict(vars(cfg), script=run["script"], num_processes=accelerator.num_processes,
                  mixed_precision=accelerator.mixed_precision, global_batch_size=global_batch,
                  steps_per_epoch=steps_per_epoch, train_samples=run["train_samples"],
                  val_samples=run["val_samples"], num_classes=len(run["class_names"]))
    start_run(accelerator, cfg, {k: ("" if v is None else v) for k, v in config.items()},
              output_dir, run["script"])
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    best = None
    step = 0
    for epoch in range(max(cfg.epochs, 1)):
        epoch_t0 = time.time()
        row = {"epoch": epoch + 1 if cfg.epochs else 0}
        if cfg.epochs:
            train_m, step = train_one_epoch(accelerator, model, train_loader, optimizer,
                                            scheduler, epoch, step, run)
            row.update({f"train_{k}": v for k, v in train_m.items()})
            accelerator.print(f"Epoch {epoch + 1}/{cfg.epochs}\n{_epoch_line('train', train_m)}")
        val_m = evaluate(accelerator, model, val_loader, run, metrics)
        accelerator.print(_epoch_line("val", val_m))
        row.update({f"val_{k}": v for k, v in val_m.items() if k != "confusion_matrix"},
                   lr=optimizer.param_groups[0]["lr"], seconds=time.time() - epoch_t0)
        accelerator.log({k.replace("_", "/", 1): v for k, v in row.items()
                         if isinstance(v, (int, float))}, step=step)
        if best is None or val_m["accuracy"] > best["val_accuracy"]:
            best = {"epoch": row["epoch"], "val_accuracy": val_m["accuracy"],
                    "val_loss": val_m["loss"], "val_macro_f1": val_m["macro_f1"],
                    "val_per_class": val_m["per_class"],
                    "confusion_matrix": val_m["confusion_matrix"]}
            if accelerator.is_main_process:
                export_model(accelerator.unwrap_model(model), os.path.join(output_dir, "best"),
                             dict(model=cfg.model, class_names=run["class_names"],
                                  head=run["head_name"], preprocessing=run["preprocessing"],
                                  epoch=best["epoch"], val_accuracy=best["val_accuracy"]))
        if accelerator.is_main_process:
            append_jsonl(metrics_path, row)
    wall = time.time() - t0
    results = dict(
        script=run["script"], model=cfg.model, best_val_accuracy=best["val_accuracy"],
        best_val_loss=best["val_loss"], best_val_macro_f1=best["val_macro_f1"],
        best_epoch=best["epoch"], epochs=cfg.epochs, train_samples=run["train_samples"],
        val_samples=val_m["samples"], num_processes=accelerator.num_processes,
        mixed_precision=accelerator.mixed_precision, global_batch_size=global_batch,
        steps_per_epoch=steps_per_epoch, wall_seconds=round(wall, 2),
        final_val_accuracy=val_m["accuracy"], class_names=run["class_names"],
        best_val_per_class=best["val_per_class"], best_confusion_matrix=best["confusion_matrix"])
    set_summary(accelerator, {k: results[k] for k in
                              ("best_val_accuracy", "best_val_loss", "best_val_macro_f1",
                               "best_epoch")})
    if accelerator.is_main_process:
        write_json(os.path.join(output_dir, "results.json"), results)
    accelerator.print(f"Training complete in {wall // 60:.0f}m {wall % 60:.0f}s\n"
                      f"Best val Acc: {best['val_accuracy']:.4f} (epoch {best['epoch']}) "
                      f"-> {output_dir}")
    accelerator.end_training()
    return results
