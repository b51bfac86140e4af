"""Export a run's best model to ONNX or TorchScript, and check the export against PyTorch.

    python export.py outputs/RUN --format onnx        # -> outputs/RUN/best/model.onnx
    python export.py outputs/RUN --format torchscript --output a.pt
    python predict.py outputs/RUN/best/model.onnx photo.jpg

The export goes into the model's folder (the run's best/) by default, beside its weights,
model.json and model card, so one folder holds everything to upload or ship
(`huggingface-cli upload USER/NAME outputs/RUN/best`).

ONNX: opset 17, a dynamic batch dimension, the input named `input` (normalised pixels,
N x 3 x H x W) and the output `logits`; the export's model.json (class names, preprocessing,
calibration temperature) goes into the file's metadata, so predict.py and anyone else can
use the file alone. Written with torch's TorchScript-based exporter (dynamo=False: the
dynamo one needs onnxscript). TorchScript: `torch.jit.trace`, model.json as the extra file
`transfer_learning.json`.

Check: the run's own val images (from its config.yaml; --images DIR for others), up to
--check N of them, through PyTorch and through the export (onnxruntime / TorchScript);
prints the largest logit difference, the largest probability difference and how many
predicted labels agree. Exits with status 1 if they disagree beyond --tolerance.
"""

import argparse
import json
import os
import sys
import warnings

import torch
import yaml

from common.data import build_transforms, image_files
from common.images import to_rgb
from common.download import BUNDLED_HYMENOPTERA
from common.errors import UserError, cli
from common.files import file_written_atomically
from common.export import ONNX_META_KEY, OnnxModel, load_exported


def _check_images(run_dir, images, limit):
    """Up to `limit` image files: --images, or the val split the run was trained with."""
    if images is None:
        cfg_path = os.path.join(run_dir, "config.yaml")
        cfg = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as fh:
                cfg = yaml.safe_load(fh) or {}
        if cfg.get("dataset"):
            raise UserError(f"{run_dir} was trained on --dataset {cfg['dataset']}: pass a "
                            "folder of images to check the export with, --images DIR")
        data = cfg.get("data_dir") or (BUNDLED_HYMENOPTERA if not cfg.get(
            "download_original_data") else os.path.join("data", "hymenoptera_data"))
        images = os.path.join(data, "val")
    files = image_files(images)
    if not files:
        raise UserError(f"no images under {images} to check the export with; pass --images DIR")
    step = max(1, len(files) // limit)  # spread over the classes (folders are sorted)
    return files[::step][:limit]


def _batch(files, preprocessing):
    from PIL import Image

    _, transform = build_transforms(preprocessing)
    return torch.stack([transform(to_rgb(Image.open(f))) for f in files])


def export_onnx(model, meta, x, path):
    import onnx

    torch.onnx.export(model, (x[:1],), path, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                             "logits": {0: "batch"}},
                      dynamo=False)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, json.dumps(meta)
    onnx.save(proto, path)
    return OnnxModel(path)


def export_torchscript(model, meta, x, path):
    traced = torch.jit.trace(model, x[:1])
    torch.jit.save(traced, path, _extra_files={"transfer_learning.json": json.dumps(meta)})
    return torch.jit.load(path)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder (or its best/ export folder)")
    parser.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    parser.add_argument("--output", help="file to write (default: model.onnx or model.pt "
                        "in the model's folder, RUN/best/)")
    parser.add_argument("--images", help="images to check the export on (default: the run's "
                        "val images)")
    parser.add_argument("--check", type=int, default=64, help="how many images to check")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest probability difference accepted")
    args = parser.parse_args(argv)
    model, meta = load_exported(args.run)
    # the model's folder (a run's best/, or an export folder given as it is) and the run
    # folder whose config.yaml names the val images
    model_dir = args.run if os.path.isfile(os.path.join(args.run, "model.json")) \
        else os.path.join(args.run, "best")
    run_dir = os.path.dirname(os.path.normpath(model_dir)) \
        if os.path.basename(os.path.normpath(model_dir)) == "best" else args.run
    output = args.output or os.path.join(model_dir, "model.onnx" if args.format == "onnx"
                                         else "model.pt")
    files = _check_images(run_dir, args.images, args.check)
    x = _batch(files, meta["preprocessing"])
    exporter = export_onnx if args.format == "onnx" else export_torchscript
    # a new file renamed over the old one: never written through a link someone left there
    with warnings.catch_warnings(), file_written_atomically(output, "--output") as tmp:
        # torch's notes that these exporters are the older ones: chosen on purpose (docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        exported = exporter(model, meta, x, tmp)
    with torch.no_grad():
        ref, got = model(x).float(), exported(x).float()
    t = meta.get("temperature") or 1.0
    logit_diff = (ref - got).abs().max().item()
    prob_diff = ((ref / t).softmax(-1) - (got / t).softmax(-1)).abs().max().item()
    agree = (ref.argmax(-1) == got.argmax(-1)).sum().item()
    print(f"{args.format} -> {output}: on {len(files)} images, largest logit difference "
          f"{logit_diff:.2e}, largest probability difference {prob_diff:.2e}, labels agree "
          f"{agree}/{len(files)}")
    if prob_diff > args.tolerance or agree != len(files):
        print(f"error: the export differs from the PyTorch model beyond --tolerance "
              f"{args.tolerance}", file=sys.stderr)
        sys.exit(1)
    return dict(output=output, logit_diff=logit_diff, prob_diff=prob_diff, agree=agree,
                checked=len(files))


if __name__ == "__main__":
    main()
