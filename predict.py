"""Classify images with an exported model: `best/` of a run (or the run folder itself), or an
ONNX file written by export.py.

    python predict.py outputs/finetune-20261127-101500 photo.jpg more_photos/ --top-k 2
    python predict.py runs/a/best data/val --output predictions.csv --probabilities
    python predict.py runs/a/model.onnx photo.jpg --tta

Class names, preprocessing (resize, crop, mean/std) and the calibration temperature come
from the export (model.json, or the ONNX file's metadata), not from the training config.
Folders are searched recursively for image files (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff
.webp). Prints `path, label, probability` per image (top-k: one line per rank);
`--output FILE.csv|.jsonl` writes the same rows to a file, `--probabilities` adds every
class's probability. `--tta` averages the logits of each image and its mirror image.
Runs batched on CUDA when available, else CPU (ONNX: onnxruntime).
"""

import argparse
import csv
import json
import os
import sys

import torch

from common.export import load_exported, load_onnx
from common.data import build_transforms, image_files
from common.images import decode_image, decode_sizes
from common.errors import UserError, cli


def list_images(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += image_files(path)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no image files in {', '.join(paths)}")
    return files


def _load(path, transform, min_side):
    try:
        return transform(decode_image(path, min_side))
    except Exception as e:  # a corrupt file: reported, the rest still classified
        print(f"warning: skipping {path} ({type(e).__name__}: {e})", file=sys.stderr)
        return None


@torch.no_grad()
def predict(model, meta, files, top_k=1, batch_size=32, device="cpu", tta=False):
    """Rows (path, label, probability, rank, {class: probability}) for each readable file,
    top-k per file; probabilities calibrated by the export's temperature (if any)."""
    _, transform = build_transforms(meta["preprocessing"])
    _, min_side = decode_sizes(meta["preprocessing"])
    names, temperature = meta["class_names"], meta.get("temperature") or 1.0
    rows = []
    for start in range(0, len(files), batch_size):
        loaded = [(f, x) for f in files[start:start + batch_size]
                  if (x := _load(f, transform, min_side)) is not None]
        if not loaded:
            continue
        x = torch.stack([x for _, x in loaded]).to(device)
        logits = model(x).float()
        if tta:  # the image and its mirror image
            logits = (logits + model(x.flip(-1)).float()) / 2
        probs = (logits / temperature).softmax(-1).cpu()
        p, idx = probs.topk(min(top_k, len(names)), dim=-1)
        for (f, _), ps, ids, every in zip(loaded, p.tolist(), idx.tolist(), probs.tolist()):
            rows += [(f, names[i], pr, r + 1, dict(zip(names, every)))
                     for r, (pr, i) in enumerate(zip(ps, ids))]
    return rows


def write_rows(rows, output, top_k, probabilities=False):
    if output.endswith(".jsonl"):
        with open(output, "w") as fh:
            for f, label, prob, rank, every in rows:
                rec = {"path": f, "label": label, "probability": prob}
                if top_k > 1:
                    rec["rank"] = rank
                if probabilities:
                    rec["probabilities"] = every
                fh.write(json.dumps(rec) + "\n")
    else:
        names = list(rows[0][4]) if rows else []
        with open(output, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label", "probability"] + (["rank"] if top_k > 1 else [])
                       + ([f"p_{n}" for n in names] if probabilities else []))
            for f, label, prob, rank, every in rows:
                w.writerow([f, label, f"{prob:.6f}"] + ([rank] if top_k > 1 else [])
                           + ([f"{every[n]:.6f}" for n in names] if probabilities else []))


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="an export folder (best/), a run folder, or an "
                        ".onnx file from export.py")
    parser.add_argument("paths", nargs="+", help="image files and/or folders")
    parser.add_argument("--top-k", type=int, default=1, help="classes per image")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", help="write rows to FILE.csv or FILE.jsonl")
    parser.add_argument("--probabilities", action="store_true",
                        help="with --output: every class's probability too")
    parser.add_argument("--tta", action="store_true",
                        help="average over each image and its horizontal mirror")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    if args.model_dir.endswith(".onnx"):
        model, meta = load_onnx(args.model_dir)
        args.device = "cpu"  # onnxruntime takes host arrays
    else:
        model, meta = load_exported(args.model_dir, args.device)
    rows = predict(model, meta, list_images(args.paths), args.top_k, args.batch_size,
                   args.device, args.tta)
    if args.output:
        write_rows(rows, args.output, args.top_k, args.probabilities)
        print(f"{len({r[0] for r in rows})} images -> {args.output}")
    else:
        for f, label, prob, rank, _ in rows:
            print(f"{f}, {label}, {prob:.4f}" + (f", {rank}" if args.top_k > 1 else ""))
    return rows


if __name__ == "__main__":
    main()
