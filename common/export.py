"""The exported best model: `<run>/best/`.

Format: `model.safetensors` (fp32 weights, no pickle) and `model.json` (model name, class
names, head names, preprocessing, the epoch and val metrics it was chosen at).
`load_exported` rebuilds the network from these two files alone, with no training config,
so `predict.py` and users' own code can load it. The folder is written beside its final
place and renamed into it, so a crash never leaves a half-replaced model.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable, Optional, TYPE_CHECKING, Union

import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.files import new_temp_dir, read_regular_file, replace_dir, write_json


if TYPE_CHECKING:  # names for the type hints only
    from torch import nn

EXPORT_FORMAT = 1


def cpu_state_dict(state: Union[dict, nn.Module]) -> dict:
    """fp32 CPU copies of a state dict's tensors (or a module's). contiguous(): channels-last
    tensors are strided views that safetensors refuses."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            .contiguous() for k, v in state.items()}


PREDICTIONS = "predictions.safetensors"


def export_model(state: Union[dict, nn.Module], out_dir: str, meta: dict,
                 model: Optional[nn.Module] = None, predictions: Optional[dict] = None) -> None:
    """Write a model's weights (a module or its state dict) and `meta` to `out_dir`,
    replacing any previous export whole. For a timm `model` (its architecture), also timm's
    own config.json with the class names, which makes the folder a timm/Hub model folder:
    `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds it, `huggingface-cli
    upload` publishes it. `predictions`: the model's val predictions per image (tensors by
    name), kept beside it as predictions.safetensors for the run's pictures and figures."""
    tmp = new_temp_dir(os.path.dirname(os.path.abspath(out_dir)), ".export-")
    save_file(cpu_state_dict(state), os.path.join(tmp, "model.safetensors"))
    if predictions is not None:
        save_file({k: v.contiguous() for k, v in predictions.items()},
                  os.path.join(tmp, PREDICTIONS))
    write_json(os.path.join(tmp, "model.json"), dict(format=EXPORT_FORMAT, **meta))
    if model is not None and hasattr(model, "pretrained_cfg"):  # timm
        from timm.models._hub import save_config_for_hf

        save_config_for_hf(model, os.path.join(tmp, "config.json"),
                           model_config={"label_names": list(meta["class_names"])})
    replace_dir(tmp, out_dir)


def load_predictions(out_dir: str) -> Optional[dict]:
    """The val predictions an export holds (tensors by name), or None."""
    path = os.path.join(out_dir, PREDICTIONS)
    return load_file(path) if os.path.isfile(path) else None


def update_export(out_dir: str, meta: Optional[dict] = None, files: Optional[dict] = None) -> None:
    """Add to an export in place, each file atomically: keys of model.json, other files
    (name -> bytes or text)."""
    from common.files import write_text

    if meta:
        path = os.path.join(out_dir, "model.json")
        with open(path) as fh:
            write_json(path, {**json.load(fh), **meta})
    for name, data in (files or {}).items():
        if isinstance(data, bytes):
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out_dir)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, os.path.join(out_dir, name))
        else:
            write_text(os.path.join(out_dir, name), data)


META_MAX_BYTES = 8 << 20     # model.json: class names and a few numbers
MAX_CLASSES = 100_000
MAX_SIDE = 4096              # pixels: an image side an exported model may ask to resize to
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming",
                  "lanczos")


def check_meta(meta: object, where: str, model_name: bool = True) -> dict:
    """`meta` (model.json, or an ONNX file's copy of it) if it holds what export writes,
    within bounds: known model sources, class names, preprocessing sizes up to MAX_SIDE,
    a positive temperature. A file from elsewhere is refused here, never obeyed (a resize
    of 100000 px would allocate ~40 GB an image).

    Raises UserError naming the file and the first field that is wrong."""
    def refuse(why):
        raise UserError(f"{where}: {why}; refusing it (not a model.json that export writes)")

    def number(value, low, high, integer=False):
        kind = int if integer else (int, float)
        return isinstance(value, kind) and not isinstance(value, bool) and low <= value <= high

    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        refuse(f"no export of format {EXPORT_FORMAT}")
    if model_name:
        from common.models import split_model_name

        name = meta.get("model")
        if not isinstance(name, str) or len(name) > 200 or \
                split_model_name(name)[0] not in ("timm", "torchvision"):
            refuse(f"'model' is {str(name)[:80]!r}, not a timm or torchvision model name")
    names = meta.get("class_names")
    if not isinstance(names, list) or not 2 <= len(names) <= MAX_CLASSES or \
            not all(isinstance(n, str) and len(n) <= 1000 for n in names):
        refuse("'class_names' is not a list of 2 to 100000 names")
    p = meta.get("preprocessing")
    if not isinstance(p, dict):
        refuse("no 'preprocessing'")
    for key in ("input_size", "resize"):
        if not number(p.get(key), 1, MAX_SIDE, integer=True):
            refuse(f"preprocessing '{key}' is {str(p.get(key))[:40]}, not 1 to {MAX_SIDE} px")
    for key, low in (("mean", -1e3), ("std", 1e-6)):
        values = p.get(key)
        if not isinstance(values, list) or len(values) not in (1, 3) or \
                not all(number(v, low, 1e3) for v in values):
            refuse(f"preprocessing '{key}' is not 1 or 3 numbers in range")
    if p.get("interpolation") not in INTERPOLATIONS:
        refuse(f"preprocessing 'interpolation' is {str(p.get('interpolation'))[:40]!r}")
    temperature = meta.get("temperature")
    if temperature is not None and not number(temperature, 1e-6, 1e6):
        refuse("'temperature' is not a positive number")
    return meta


def _read_meta(path: str) -> dict:
    """model.json of an export folder: a regular file (no link, FIFO or device) within
    META_MAX_BYTES, parsed and checked."""
    raw = read_regular_file(path, "model.json", max_size=META_MAX_BYTES)
    where = os.path.join(path, "model.json")
    if raw is None:
        raise UserError(f"{path}: no exported model here (expected model.json and "
                        "model.safetensors, or a run folder with best/)")
    if raw is False:
        raise UserError(f"{where}: a link, not a regular file, or over "
                        f"{META_MAX_BYTES >> 20} MB; refusing it")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise UserError(f"{where}: not valid JSON; refusing it") from None
    return check_meta(meta, where)


def _architecture(path: str, meta: dict) -> str:
    """The model name to build offline. An `hf-hub:ORG/NAME` model is rebuilt from the
    timm architecture in the export's own config.json (its model_args are not passed on):
    building it by its Hub name would download that config, even without weights."""
    name = meta["model"]
    if not name.startswith("hf-hub:"):
        return name
    from common.models import check_model_name

    raw = read_regular_file(path, "config.json", max_size=META_MAX_BYTES)
    try:
        arch = json.loads(raw.decode("utf-8"))["architecture"]
        check_model_name(f"timm:{arch}")
    except Exception:  # absent, unreadable, or not a known timm architecture
        raise UserError(f"{os.path.join(path, 'config.json')}: the export of {name} holds "
                        "no known timm 'architecture' to rebuild it from offline") from None
    return f"timm:{arch}"


def load_exported(path: str, device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from an export folder or a run folder (its `best/`).
    Nothing is downloaded: the architecture is built without pretrained weights, from
    model.json's name (checked: check_meta) or, for a Hub model, the folder's config.json.

    Raises UserError: no export there, or a model.json / weights file that is not one."""
    from common.models import build_model

    if os.path.isfile(os.path.join(path, "best", "model.json")):
        path = os.path.join(path, "best")
    meta = _read_meta(path)
    model = build_model(_architecture(path, meta), len(meta["class_names"]),
                        pretrained=False).model
    try:
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    except Exception as e:  # missing, not safetensors, or tensors of another model
        raise UserError(f"{os.path.join(path, 'model.safetensors')}: not the weights of "
                        f"{meta['model']} with {len(meta['class_names'])} classes "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval(), meta


ONNX_META_KEY = "transfer_learning"  # model.json, in the ONNX file's metadata_props


class OnnxModel:
    """An ONNX file as a callable on torch tensors (onnxruntime; CUDA when it has it)."""

    def __init__(self, path):
        import onnxruntime

        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in onnxruntime.get_available_providers()]
        self.session = onnxruntime.InferenceSession(path, providers=providers)
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x):
        out = self.session.run(None, {self.input: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def load_onnx(path: str) -> tuple[Callable, dict]:
    """(callable model, meta) from an ONNX file written by export.py."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError("ONNX models need onnxruntime: pip install -e '.[export]'")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    model = OnnxModel(path)
    meta = model.session.get_modelmeta().custom_metadata_map.get(ONNX_META_KEY)
    if meta is None:
        raise UserError(f"{path}: an ONNX file without this project's metadata (class names, "
                        "preprocessing); export it with export.py")
    try:
        meta = json.loads(meta)
    except (ValueError, RecursionError):
        raise UserError(f"{path}: its {ONNX_META_KEY} metadata is not valid JSON") from None
    return model, check_meta(meta, f"{path} (its metadata)", model_name=False)
