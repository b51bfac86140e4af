"""The exported best model: `<run>/best/`.

Format: `model.safetensors` (fp32 weights, no pickle) and `model.json` (model name, class
names, head names, preprocessing, the epoch and val metrics it was chosen at).
`load_exported` rebuilds the network from these two files alone, with no training config,
so `predict.py` and users' own code can load it. The folder is written beside its final
place and renamed into it, so a crash never leaves a half-replaced model.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError
from common.files import new_temp_dir, replace_dir, write_json

EXPORT_FORMAT = 1


def cpu_state_dict(state):
    """fp32 CPU copies of a state dict's tensors (or a module's). contiguous(): channels-last
    tensors are strided views that safetensors refuses."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
            .contiguous() for k, v in state.items()}


def export_model(state, out_dir, meta):
    """Write a model's weights (a module or its state dict) and `meta` to `out_dir`,
    replacing any previous export whole."""
    tmp = new_temp_dir(os.path.dirname(os.path.abspath(out_dir)), ".export-")
    save_file(cpu_state_dict(state), os.path.join(tmp, "model.safetensors"))
    write_json(os.path.join(tmp, "model.json"), dict(format=EXPORT_FORMAT, **meta))
    replace_dir(tmp, out_dir)


def load_exported(path, device="cpu"):
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
