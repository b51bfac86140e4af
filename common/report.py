"""The end of a run: results.json, the pictures, the calibrated temperature and the model
card in best/ (main process), the tracker's summary, and the last lines printed."""

from __future__ import annotations

import os
from typing import Optional, TYPE_CHECKING

from common.best import best_predictions
from common.calibration import expected_calibration_error, fit_temperature
from common.card import model_card
from common.export import update_export
from common.files import write_json
from common.log import logger
from common.metrics import wilson_interval
from common.tracking import log_pictures, set_summary
from common.viz import confusion_matrix_png, prediction_grid_png, top_losses_png


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.checkpoint import TrainState
    from common.config import TrainConfig
    from common.data import Data
    from common.models import Network


def finish(accelerator: Accelerator, cfg: TrainConfig, *, network: Network, data: Data,
           state: TrainState, val_m: dict, metrics: dict, output_dir: str, global_batch: int,
           steps_per_epoch: int, wall: float, stopped_early: Optional[int], figures: dict) -> dict:
    """results.json (main process) and the results dict every process returns. `val_m`:
    the last evaluation; `figures`: what the run measured besides (start-up, memory, the
    probe's and the feature cache's numbers), merged in as they are."""
    best = state.best
    n_val = val_m["samples"]
    predictions = per_class = confusion = None  # read from best/ by the main process only
    if accelerator.is_main_process:
        predictions, per_class, confusion = best_predictions(output_dir, metrics,
                                                             data.class_names)
    low, high = wilson_interval(round(best.val_accuracy * n_val), n_val)
    results = dict(
        script=cfg.script, model=cfg.model, output_dir=output_dir,
        best_val_accuracy=best.val_accuracy,
        best_val_accuracy_ci95=[low, high], best_val_loss=best.val_loss,
        best_val_macro_f1=best.val_macro_f1,
        best_val_balanced_accuracy=best.val_balanced_accuracy, best_epoch=best.epoch,
        best_stage=best.stage,
        best_weights=best.source, select_metric=cfg.select_metric, epochs=cfg.epochs,
        stopped_early_after_epoch=stopped_early,
        train_samples=len(data.train_images), val_samples=n_val,
        image_size=network.preprocessing["input_size"],
        num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
        global_batch_size=global_batch, steps_per_epoch=steps_per_epoch,
        optimizer_steps=state.step, wall_seconds=round(wall, 2), lr=state.lr or cfg.lr,
        final_val_accuracy=val_m["accuracy"], final_val_loss=val_m["loss"],
        class_names=data.class_names, best_val_per_class=per_class,
        best_confusion_matrix=confusion, **figures)
    if per_class is not None:  # (main process)
        missing = [c for c, d in per_class.items() if not d["val_images"]]
        if missing:
            results["classes_without_val_images"] = missing
            logger.warning(f"no val image of {len(missing)} class(es) ({', '.join(missing[:8])}"
                           f"{', ...' if len(missing) > 8 else ''}): balanced accuracy and "
                           "macro-F1 average over the other classes")
    set_summary(accelerator, {k: results[k] for k in ("best_val_accuracy", "best_val_loss",
                                                      "best_val_macro_f1", "best_epoch")})
    if accelerator.is_main_process:
        _calibrate(predictions, results)
        write_json(os.path.join(output_dir, "results.json"), results)
        pre, names = network.preprocessing, data.class_names
        pictures = {
            "confusion_matrix": confusion_matrix_png(
                confusion, names, os.path.join(output_dir, "confusion_matrix.png"),
                f"Best epoch {best.epoch} on val"),
            "predictions": prediction_grid_png(data.val_images, predictions, pre, names,
                                               os.path.join(output_dir, "predictions.png")),
            "top_losses": top_losses_png(data.val_images, predictions, pre, names,
                                         os.path.join(output_dir, "top_losses.png"))}
        log_pictures(accelerator, {k: v for k, v in pictures.items() if v}, state.step)
        _finish_export(cfg, network, results, os.path.join(output_dir, "best"),
                       pictures["confusion_matrix"])
    logger.result(f"Training complete in {wall // 60:.0f}m {wall % 60:.0f}s\n"
                  f"Best val Acc: {best.val_accuracy:.4f} (95% CI {low:.3f}-{high:.3f}, "
                  f"{n_val} images; epoch {best.epoch}) -> {output_dir}")
    accelerator.end_training()
    return results


def _calibrate(predictions, results):
    """Temperature scaling of the best model on its val logits (common/calibration.py)."""
    logits, labels = predictions["logits"], predictions["label"]
    t = fit_temperature(logits, labels)
    results.update(temperature=round(t, 4),
                   val_ece=round(expected_calibration_error(logits, labels), 4),
                   val_ece_calibrated=round(expected_calibration_error(logits, labels, t), 4))


def _finish_export(cfg, network, results, best_dir, confusion_png):
    """best/: the temperature in model.json, the model card and its picture."""
    with open(confusion_png, "rb") as fh:
        picture = fh.read()
    timm_arch = getattr(network.model, "pretrained_cfg", {}).get("architecture")
    card = model_card(cfg, results, timm_arch, {"confusion_matrix.png"})
    update_export(best_dir, meta=dict(temperature=results["temperature"]),
                  files={"confusion_matrix.png": picture, "README.md": card})
