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
from common.files import new_temp_dir, replace_dir, write_json


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


def load_exported(path: str, device: Union[str, torch.device] = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from an export folder or a run folder (its `best/`)."""
    from common.models import build_model

    if os.path.isfile(os.path.join(path, "best", "model.json")):
        path = os.path.join(path, "best")
    meta_path = os.path.join(path, "model.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{path}: no exported model here (expected model.json and "
                        "model.safetensors, or a run folder with best/)")
    with open(meta_path) as fh:
        meta = json.load(fh)
    model = build_model(meta["model"], len(meta["class_names"]), pretrained=False).model
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
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
    return model, json.loads(meta)
