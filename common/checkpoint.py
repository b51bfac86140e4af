"""Run-folder files, written atomically, and the exported best model.

Export format (`<run>/best/`): `model.safetensors` (fp32 weights, no pickle) and
`model.json` (model name, class names, head name, preprocessing, the epoch and val metrics
it was chosen at). `load_exported` rebuilds the network from these two files alone, with
no training config, so `predict.py` and users' own code can load it.

Every write goes to a temporary name in the same folder and is renamed into place, so a
crash never leaves a half-written file or a half-replaced model behind.
"""

import hashlib
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


# --- full training state (resume) -------------------------------------------------------

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"


class TrainState:
    """What a checkpoint carries besides model, optimiser, scheduler and RNG states:
    progress counters, the best result so far, the current epoch's partial train metrics and
    the tracker run id. Registered with `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.epoch = 0            # epoch in progress (0-based) = epochs completed
        self.batches_done = 0     # batches of that epoch already trained on (per process)
        self.step = 0             # optimiser steps so far
        self.best = None          # dict of the best epoch's val metrics
        self.partial = None       # gathered (losses, preds, labels) of the current epoch
        self.tracker_run_id = None
        self.wall_seconds = 0.0   # time spent in earlier (interrupted) sessions
        self.lr = None            # the peak lr chosen by --lr auto

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, state):
        vars(self).update(state)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(ckpt):
    files = sorted(os.path.relpath(os.path.join(d, f), ckpt)
                   for d, _, fs in os.walk(ckpt) for f in fs)
    write_json(os.path.join(ckpt, MANIFEST),
               {"written_by": "transfer-learning", "files": {f: _sha256(os.path.join(ckpt, f))
                                                           for f in files}})


def verify_checkpoint(ckpt):
    """Refuse anything this tool did not write, or that changed since: Accelerate's state
    files are pickles (RNG states, sampler), which must never come from elsewhere."""
    manifest = os.path.join(ckpt, MANIFEST)
    try:
        with open(manifest) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"--resume-from-checkpoint {ckpt}: not a checkpoint written by these "
                        f"scripts (no valid {MANIFEST}); refusing to load its pickled state") from None
    for rel, digest in files.items():
        path = os.path.join(ckpt, rel)
        if not os.path.isfile(path) or _sha256(path) != digest:
            raise UserError(f"--resume-from-checkpoint {ckpt}: {rel} is missing or changed "
                            "since it was written; pick another checkpoint")


def _complete_checkpoints(root):
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if d.startswith("step-") and os.path.isfile(os.path.join(root, d, MANIFEST)))


def resolve_checkpoint(arg, output_dir):
    """The checkpoint folder for `--resume-from-checkpoint latest|PATH`, verified."""
    if arg != "latest":
        path = arg
    else:
        root = os.path.join(output_dir, CHECKPOINTS)
        name = None
        if os.path.isfile(os.path.join(root, "latest")):
            with open(os.path.join(root, "latest")) as fh:
                name = fh.read().strip()
        if not name or not os.path.isfile(os.path.join(root, name, MANIFEST)):
            done = _complete_checkpoints(root)  # the pointer is written last: fall back
            name = done[-1] if done else None
        if name is None:
            raise UserError(f"--resume-from-checkpoint latest: no checkpoint in {root}; "
                            "start the run without it")
        path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise UserError(f"--resume-from-checkpoint {path}: no such folder")
    verify_checkpoint(path)
    return path


def read_train_state(ckpt):
    """TrainState fields of a verified checkpoint, before `accelerator.load_state`."""
    state = TrainState()
    state.load_state_dict(torch.load(os.path.join(ckpt, "custom_checkpoint_0.pkl"),
                                     weights_only=True))
    return state


def save_checkpoint(accelerator, output_dir, state, total_limit):
    """All ranks: `accelerator.save_state` into a temporary folder, then (main) a manifest,
    an atomic rename to checkpoints/step-N, the `latest` pointer, and pruning to the last
    `total_limit`. A kill at any point leaves `latest` naming a complete checkpoint."""
    root = os.path.join(output_dir, CHECKPOINTS)
    name = f"step-{state.step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if os.path.isdir(final):  # same point already saved (epoch end after a step checkpoint)
        return final
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(tmp)
        os.replace(tmp, final)
        fd, ptr = tempfile.mkstemp(prefix=".tmp-", dir=root)
        with os.fdopen(fd, "w") as fh:
            fh.write(name + "\n")
        _usual_mode(ptr)
        os.replace(ptr, os.path.join(root, "latest"))
        for stale in os.listdir(root):  # leftovers of saves that were killed
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        done = _complete_checkpoints(root)
        for old in done[:-total_limit] if total_limit else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
