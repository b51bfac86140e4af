"""Pictures of a run, as PNG files: confusion matrix, prediction grid, top losses,
augmentation preview, and the curves of `compare_runs.py` (matplotlib for the charts, PIL for
the image grids)."""

import itertools
import math
from typing import Any, Optional

import numpy as np
import torch


def _pyplot():
    """matplotlib, imported when a chart is drawn (half a second that training need not
    wait for), with the Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def denormalize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """A normalised CHW tensor back to an HWC array in [0, 1] for display."""
    x = x.float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def confusion_matrix_png(cm: list, class_names: list, path: str,
                         title: str = "Confusion matrix (val)") -> str:
    plt = _pyplot()
    cm = np.asarray(cm)
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black")
    ax.set_title(f"{title}: {np.trace(cm)}/{cm.sum()} correct")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _font(size):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def image_grid_png(images: list, captions: list, path: str, *, wrong: Optional[list] = None,
                   title: Optional[str] = None, cols: int = 4) -> str:
    """images: HWC arrays in [0, 1]; `wrong[i]` draws a red caption and frame. Drawn with
    PIL (a matplotlib figure of 16 subplots took ~1.5 s, which the extractor's whole
    training takes on cached features)."""
    from PIL import Image, ImageDraw

    n = len(images)
    cols = min(cols, n) or 1
    rows = math.ceil(n / cols) or 1
    cell, pad, text_h, title_h = 224, 8, 40, 36 if title else 0
    sheet = Image.new("RGB", (cols * (cell + pad) + pad,
                              title_h + rows * (cell + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    if title:
        draw.text((pad, 8), title, fill="black", font=_font(18))
    for k in range(n):
        x = pad + (k % cols) * (cell + pad)
        y = title_h + pad + (k // cols) * (cell + text_h + pad)
        img = Image.fromarray((np.asarray(images[k]) * 255).round().astype(np.uint8))
        img.thumbnail((cell, cell))
        sheet.paste(img, (x + (cell - img.width) // 2, y + text_h + (cell - img.height) // 2))
        bad = bool(wrong[k]) if wrong is not None else False
        draw.multiline_text((x, y + 2), captions[k], fill="red" if bad else "black", font=font,
                            spacing=2)
        if bad:
            draw.rectangle([x, y + text_h, x + cell - 1, y + text_h + cell - 1], outline="red",
                           width=4)
    sheet.save(path)
    return path


def curves_png(runs: list, path: str) -> str:
    """runs: list of (label, epochs, val_accuracy, val_loss); one line per run."""
    import matplotlib.ticker

    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, epochs, acc, loss in runs:
        acc_ax.plot(epochs, acc, marker="o", label=label)
        loss_ax.plot(epochs, loss, marker="o", label=label)
    acc_ax.set(xlabel="epoch", ylabel="val accuracy", title="Validation accuracy")
    loss_ax.set(xlabel="epoch", ylabel="val loss", title="Validation loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def augmentation_preview_png(dataset: Any, preprocessing: dict, class_names: list, path: str,
                             n: int = 16) -> str:
    """`n` random training images as the model sees them in epoch 1 (augmented, denormalised
    with the model's own mean/std), like the tutorial's `imshow` grid of a batch."""
    p, names = preprocessing, class_names
    if isinstance(dataset, torch.utils.data.IterableDataset):  # --streaming: the first ones
        items = list(itertools.islice(iter(dataset), n))
    else:
        pick = torch.randperm(len(dataset),
                              generator=torch.Generator().manual_seed(dataset.seed or 0))
        items = [dataset[int(i)] for i in pick[:n]]
    return image_grid_png([denormalize(it["pixel_values"], p["mean"], p["std"]) for it in items],
                          [names[it["labels"]] for it in items], path,
                          title="Training augmentation (epoch 1)")


def prediction_grid_png(dataset: Any, predictions: dict, preprocessing: dict, class_names: list,
                        path: str, *, n: int = 16) -> str:
    """Val images with predicted (probability) and true labels, misclassified ones first and
    marked in red, like the tutorial's `visualize_model`."""
    p, names = preprocessing, class_names
    rows = list(zip(predictions["index"], predictions["pred"], predictions["label"],
                    predictions["prob"]))
    if isinstance(dataset, torch.utils.data.IterableDataset):  # --streaming: no random
        # access; the images among the first 2000 of this process's part
        seen = {it["index"]: it for it in itertools.islice(iter(dataset), 2000)}
        rows = [r for r in rows if r[0] in seen]
        fetch = lambda i: seen[i]  # noqa: E731
    else:
        fetch = dataset.__getitem__
    rows.sort(key=lambda r: r[1] == r[2])  # wrong ones first, dataset order otherwise
    rows = rows[:n]
    images = [denormalize(fetch(i)["pixel_values"], p["mean"], p["std"]) for i, *_ in rows]
    captions = [f"pred {names[pr]} ({pb:.2f})\ntrue {names[lb]}" for _, pr, lb, pb in rows]
    wrong = [pr != lb for _, pr, lb, _ in rows]
    return image_grid_png(images, captions, path, wrong=wrong,
                          title=f"Val predictions: {sum(wrong)} wrong shown first")


def lr_find_png(lrs: list, smoothed: list, suggested: Optional[float], path: str) -> str:
    """LR range test: smoothed training loss against the learning rate (log scale), with
    the suggested lr marked (None: the loss never fell, the whole curve is shown)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, smoothed)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head; other groups keep their scale)")
    ax.set_ylabel("training loss (smoothed)")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--",
                   label=f"suggested lr {suggested:.2e}")
        low, high = min(smoothed), smoothed[0]  # the falling part; the divergence is cut
        ax.set_ylim(low - 0.1 * (high - low + 1e-8), max(high, low) + 0.5 * (high - low + 1e-8))
        ax.legend()
    ax.set_title("LR range test" + ("" if suggested is not None else
                                    ": the loss never fell, no suggestion"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def top_losses_png(dataset: Any, predictions: dict, preprocessing: dict, class_names: list,
                   path: str, *, n: int = 16) -> Optional[str]:
    """The val images the model got most wrong (highest loss): true label, prediction and
    its probability, as fastai's plot_top_losses. Often shows mislabelled images."""
    p, names = preprocessing, class_names
    rows = sorted(zip(predictions["index"], predictions["pred"], predictions["label"],
                      predictions["prob"], predictions["loss"]), key=lambda r: -r[4])[:n]
    if isinstance(dataset, torch.utils.data.IterableDataset):  # --streaming: not drawn
        return None
    images = [denormalize(dataset[i]["pixel_values"], p["mean"], p["std"]) for i, *_ in rows]
    captions = [f"true {names[lb]}, pred {names[pr]}\n({pb:.2f}, loss {ls:.2f})"
                for _, pr, lb, pb, ls in rows]
    return image_grid_png(images, captions, path, wrong=[pr != lb for _, pr, lb, _, _ in rows],
                          title="Val images with the highest loss")
