"""Classification metrics through the `evaluate` library, from modules shipped in this repo.

`evaluate.load("accuracy")` downloads its script from the Hub, which fails offline with a
misleading FileNotFoundError; `evaluate.load(<local folder>)` runs the same machinery on
the modules in `common/evaluate_metrics/`. Metrics are computed on tensors gathered from
every process (`gather_for_metrics`), so every rank gets the same exact numbers.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, TYPE_CHECKING


if TYPE_CHECKING:  # names for the type hints only
    import torch
    from accelerate import Accelerator

_MODULES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluate_metrics")


_LOADED: Optional[dict] = None


def load_metrics(accelerator: Optional[Accelerator] = None) -> dict:
    """The accuracy and per-class modules, loaded at the first call in this process (at the
    first evaluation, so that training starts without waiting for `evaluate`'s import).
    With `accelerator`, called by every process at the same points: the main one loads
    first, since evaluate copies each script into the HF modules cache under a file lock."""
    global _LOADED
    if _LOADED is None:
        import evaluate

        with accelerator.main_process_first() if accelerator else contextlib.nullcontext():
            _LOADED = {name: evaluate.load(os.path.join(_MODULES, name), keep_in_memory=True)
                       for name in ("accuracy", "per_class")}
    return _LOADED


def compute_metrics(metrics: dict, predictions: torch.Tensor, references: torch.Tensor,
                    class_names: list) -> dict:
    """accuracy, macro F1, balanced accuracy (mean per-class recall), and per-class
    precision/recall/F1/val_images + confusion matrix. The averages leave out the classes
    with no image in `references`."""
    predictions, references = predictions.tolist(), references.tolist()
    acc = metrics["accuracy"].compute(predictions=predictions, references=references)
    pc = metrics["per_class"].compute(predictions=predictions, references=references,
                                      num_classes=len(class_names))
    per_class = {name: {"precision": pc["precision"][i], "recall": pc["recall"][i],
                        "f1": pc["f1"][i], "val_images": pc["support"][i]}
                 for i, name in enumerate(class_names)}
    return {"accuracy": acc["accuracy"], "macro_f1": pc["macro_f1"],
            "balanced_accuracy": pc["macro_recall"], "per_class": per_class,
            "confusion_matrix": pc["confusion_matrix"]}


def score(m: dict, metric: str) -> float:
    """--select-metric as a number where higher is better."""
    return -m["loss"] if metric == "loss" else m[metric]


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of `correct` out of `n`: on 150 val images
    one image is 0.7 points, and the interval says how much of a difference is noise."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)
