"""Run-folder files, written atomically, and the exported best model.

Export format (`<run>/best/`): `model.safetensors` (fp32 weights, no pickle) and
`model.json` (model name, class names, head name, preprocessing, the epoch and val metrics
it was chosen at). `load_exported` rebuilds the network from these two files alone, with
no training config, so `predict.py` and users' own code can load it.

Every write goes to a temporary name in the same folder and is renamed into place, so a
crash never leaves a half-written file or a half-replaced model behind.
"""

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from common.errors import UserError

EXPORT_FORMAT = 1


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path, directory=False):
    """mkstemp/mkdtemp create 0600/0700 entries; give the user's usual permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_json(path, obj):
    """Atomically replace `path` with `obj` as indented JSON."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    _usual_mode(tmp)
    os.replace(tmp, path)


def append_jsonl(path, obj):
    with open(path, "a") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def export_model(model, out_dir, meta):
    """Write `model`'s weights and `meta` to `out_dir`, replacing any previous export whole."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    _usual_mode(tmp, directory=True)
    # contiguous(): channels-last tensors are strided views that safetensors refuses.
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             .contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(tmp, "model.safetensors"))
    write_json(os.path.join(tmp, "model.json"), dict(format=EXPORT_FORMAT, **meta))
    old = None
    if os.path.isdir(out_dir):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(out_dir, os.path.join(old, "x"))
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


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
    model, _, _ = build_model(meta["model"], len(meta["class_names"]), pretrained=False)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.to(device).eval(), meta
