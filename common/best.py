"""The best model so far: chosen by --select-metric on val after each evaluation, exported to
`<run>/best/` (weights, model.json, the val predictions per image) by the main process.

Its scalars (`Best`) ride in every checkpoint's train state; the predictions per image (50k x
1000 logits would be ~1 GB as JSON on every process) stay in best/predictions.safetensors."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Optional, TYPE_CHECKING

import torch
from accelerate.utils import broadcast
from safetensors.torch import load_file, save as safetensors_bytes

from common.accelerator import bare_model
from common.engine import evaluate
from common.export import PREDICTIONS, export_model, load_predictions, update_export
from common.log import logger
from common.metrics import compute_metrics, load_metrics, score


if TYPE_CHECKING:  # names for the type hints only
    from common.checkpoint import TrainState
    from torch import nn


@dataclasses.dataclass
class Best:
    """The best evaluation so far."""

    epoch: int                # 0: the starting model (after the linear probe)
    score: float              # --select-metric, higher is better (minus the loss for loss)
    source: str               # "model", or "ema" when the moving average scored better
    val_accuracy: float
    val_loss: float
    val_macro_f1: float
    val_balanced_accuracy: float
    stage: str = ""           # probe, head or all-layers ("" in older checkpoints)

    @classmethod
    def read(cls, saved: Optional[dict]) -> Optional["Best"]:
        """From a train state (None before the first evaluation); keys of other versions
        (the predictions older checkpoints carried here) are left out."""
        if saved is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


class BestKeeper:
    """Keeps `state.best` and best/ up to date: `consider` after every evaluation."""

    def __init__(self, accelerator, cfg, network, class_names: list, output_dir: str):
        self.accelerator, self.cfg, self.network = accelerator, cfg, network
        self.class_names, self.dir = class_names, os.path.join(output_dir, "best")

    def consider(self, state: TrainState, epoch: int, val_m: dict, source: str,
                 module: nn.Module, stage: str = "") -> bool:
        """Keep (and export, main process) `module`, the trained module or its EMA, if its
        --select-metric beats the best so far. Returns whether it did."""
        new_score = score(val_m, self.cfg.select_metric)
        if state.best is not None and new_score <= state.best.score:
            return False
        state.best = Best(epoch=epoch, score=new_score, source=source,
                          val_accuracy=val_m["accuracy"], val_loss=val_m["loss"],
                          val_macro_f1=val_m["macro_f1"],
                          val_balanced_accuracy=val_m["balanced_accuracy"], stage=stage)
        if self.accelerator.is_main_process:
            network = self.network
            export_model(self._whole_state(bare_model(self.accelerator, module)
                                           if source == "model" else module),
                         self.dir,
                         dict(model=self.cfg.model, class_names=self.class_names,
                              heads=list(network.head_names),
                              preprocessing=network.preprocessing, epoch=epoch,
                              weights=source, val_accuracy=val_m["accuracy"],
                              val_samples=val_m["samples"]), model=network.model,
                         predictions=val_m["predictions"])
        return True

    def rescore_reason(self, feature_precision: Optional[str]) -> Optional[str]:
        """Why the best evaluation was not what the exported model scores in fp32 on the val
        images, as predict.py runs it (None: it was): bf16 features of a folded copy of the
        backbone, an autocast evaluation, or --tta that cached features cannot apply."""
        cached = self.network.feature_heads is not None
        if cached and feature_precision == "bf16":
            return "chosen on bf16 features"
        if self.accelerator.mixed_precision != "no":
            return f"chosen under {self.accelerator.mixed_precision} autocast"
        if self.network.feature_heads is not None and self.cfg.tta:
            return "chosen on features without --tta"
        return None

    def rescore(self, state: TrainState, images: Iterable, reason: str) -> dict:
        """Evaluate best/ (every process: rank 0's file, broadcast) in fp32 on `images`, a
        loader of the val images; its figures become the best's (state.best, best/'s
        predictions and model.json). Returns the new val metrics."""
        model, accelerator = self.network.model, self.accelerator
        model.to(accelerator.device, memory_format=torch.contiguous_format).eval()
        # contiguous buffers on every process: a broadcast copies raw memory, and a
        # channels-last tensor would take a contiguous one's values in another order
        weights = {k: v.detach().clone(memory_format=torch.contiguous_format)
                   for k, v in model.state_dict().items()}
        if accelerator.is_main_process:
            saved = load_file(os.path.join(self.dir, "model.safetensors"))
            weights = {k: saved[k].to(accelerator.device).contiguous() for k in weights}
        if accelerator.num_processes > 1:
            weights = broadcast(weights)
        model.load_state_dict(weights)
        m = evaluate(model, images, load_metrics(accelerator), self.class_names,
                     accelerator=accelerator, tta=self.cfg.tta, autocast=False,
                     progress=False)
        best = state.best
        logger.info(f"best model (epoch {best.epoch}) scored as exported, fp32 on the val "
                    f"images: accuracy {m['accuracy']:.4f} ({reason}: "
                    f"{best.val_accuracy:.4f})")
        chosen = best.val_accuracy
        best.val_accuracy, best.val_loss = m["accuracy"], m["loss"]
        best.val_macro_f1, best.val_balanced_accuracy = m["macro_f1"], m["balanced_accuracy"]
        if accelerator.is_main_process:
            update_export(self.dir, meta=dict(val_accuracy=m["accuracy"],
                                              val_samples=m["samples"],
                                              val_accuracy_when_chosen=chosen),
                          files={PREDICTIONS: safetensors_bytes(
                              {k: v.contiguous() for k, v in m["predictions"].items()})})
        accelerator.wait_for_everyone()
        return dict(m, chosen_accuracy=chosen)

    def _whole_state(self, module) -> dict:
        """The whole network's state with `module` (the trained module or its EMA) in it."""
        state = module.state_dict()
        if self.network.feature_heads is None:
            return state
        full = self.network.model.state_dict()  # cached features: `module` is FeatureHeads
        for k, v in state.items():  # heads.<i>.<rest> -> <name of head i>.<rest>
            _, i, rest = k.split(".", 2)
            full[f"{self.network.head_names[int(i)]}.{rest}"] = v
        return full


def best_predictions(output_dir: str, metrics: dict, class_names: list) -> tuple[dict, dict, list]:
    """Main process: the best model's val predictions (lists by name) from best/, and its
    per-class figures and confusion matrix computed from them."""
    loaded = load_predictions(os.path.join(output_dir, "best"))
    m = compute_metrics(metrics, loaded["pred"], loaded["label"], class_names)
    return {k: v.tolist() for k, v in loaded.items()}, m["per_class"], m["confusion_matrix"]


def legacy_predictions(best: Optional[dict]) -> Optional[dict]:
    """The per-image predictions checkpoints written before best/predictions.safetensors
    carried in their train state, as tensors (None where there are none)."""
    if not best or "predictions" not in best:
        return None
    return {k: torch.as_tensor(v) for k, v in best["predictions"].items()}
