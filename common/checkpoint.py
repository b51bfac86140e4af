"""Full training state for `--resume-from-checkpoint`, in files that cannot carry code.

A checkpoint folder `checkpoints/step-N/` holds:
    model.safetensors     the trained module's tensors
    optimizer.pt          optimizer.state_dict() (tensors, numbers, strings), loaded with
                          torch.load(weights_only=True)
    train_state.json      TrainState (progress, best result, running train sums, lr, W&B
                          run id, the world it was counted in) and the GradScaler's numbers
    rng-R.json            process R's RNG states (python, numpy, torch CPU/CUDA) as numbers
    best/                 the exported best model as of this checkpoint (hard links)
    manifest.json         sha256 of every file
No file is unpickled with code-running pickle: safetensors and JSON have no code, and
`weights_only=True` refuses any pickle that names a function or class outside torch's
allow-list. So a checkpoint folder from elsewhere can be wrong, but it cannot run code. The
manifest is an integrity check (it catches a truncated or half-copied folder), not a
security boundary: anyone can rewrite it. Every file is read once, checked against the
manifest and parsed from those same bytes.

Nor can a checkpoint from elsewhere make a resume read or write outside its folders (as
tarfile's `filter="data"`): every name in its manifest must be one of the names above
(`best/` one level deep, the files an export holds), read as a regular file that is no
symbolic link and lies inside the checkpoint; `latest` must name a `step-N` folder; and
`best/` is restored under those checked names only, inside the run folder.

Writes are atomic: a temporary folder, renamed into place, then the `latest` pointer.
Resuming from an older checkpoint moves the abandoned later ones aside
(`checkpoints/abandoned/`) and restores `best/` to what it was at that checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from safetensors.torch import save_file

from common.accelerator import bare_model, seed_for_training
from common.best import Best, legacy_predictions
from common.engine import Totals
from common.errors import RunFailure, UserError
from common.export import PREDICTIONS, cpu_state_dict
from common.files import (SIZE_DIFFERS, link_or_copy, read_regular_file, replace_dir,
                          usual_mode, write_json, write_text)
from common.log import logger


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig
    from common.ema import ModelEma
    from torch import nn

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 2
STEP_NAME = re.compile(r"step-[0-9]{1,12}")  # checkpoints/step-N (and `latest`'s content)
# Every file a checkpoint may name: its own, each rank's RNG states, the EMA, and best/
# (what common/export.py and the end of a run write there). Nothing else is read.
TOP_FILES = re.compile(r"(model\.safetensors|optimizer\.pt|train_state\.json|"
                       r"rng-[0-9]{1,6}\.json|ema\.safetensors)")
BEST_FILES = frozenset({"model.safetensors", "model.json", "config.json", "README.md",
                        "confusion_matrix.png", "predictions.safetensors"})


def _checked_name(rel):
    """`rel` if it is a file name a checkpoint may hold ('best/NAME' one level deep), else
    None: no absolute path, no '..', no other folder, no name outside the known set."""
    if not isinstance(rel, str):
        return None
    if TOP_FILES.fullmatch(rel):
        return rel
    folder, _, name = rel.partition("/")
    return rel if folder == "best" and name in BEST_FILES else None


@dataclass
class TrainState:
    """Training progress: everything a checkpoint carries besides tensors and RNG states."""

    epoch: int = 0              # epoch in progress (0-based) = epochs completed
    batches_done: int = 0       # batches of that epoch already trained on, per process
    step: int = 0               # optimiser steps so far
    best: Optional[Best] = None  # the best evaluation so far (its predictions: in best/)
    train_sums: Totals = field(default_factory=Totals)  # of the epoch in progress, over all
    #                             processes
    tracker_run_id: Optional[str] = None
    run_dir: Optional[str] = None  # the run folder (real path) the checkpoint was taken in
    wall_seconds: float = 0.0   # time spent in earlier (interrupted) sessions
    lr: Optional[float] = None  # the peak lr trained with (given, or found by --lr auto)
    class_names: Optional[list] = None   # the labels' names, in label order
    data_identity: Optional[str] = None  # digest of the train and val images' identities
    # the world `batches_done` and `step` were counted in
    num_processes: int = 1
    batch_size: int = 0
    gradient_accumulation_steps: int = 1
    ema_updates: Optional[int] = None  # --model-ema: the average's update count
    # the LR schedule's own position: behind `step` by the steps the fp16 GradScaler skipped
    # (None in checkpoints written before it was kept: then `step`)
    schedule_steps: Optional[int] = None

    def schedule_position(self) -> int:
        """Where a resumed LR schedule continues."""
        return self.step if self.schedule_steps is None else self.schedule_steps

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in d.items() if k in names})
        state.best = Best.read(state.best)
        state.train_sums = Totals.read(state.train_sums)
        return state


# --- saving -------------------------------------------------------------------------------

def _rng_state():
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(mt), gauss],
                numpy=[name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                torch=torch.get_rng_state().tolist(),
                cuda=[s.tolist() for s in torch.cuda.get_rng_state_all()]
                if torch.cuda.is_available() else [])


def _set_rng_state(s):
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(c, dtype=torch.uint8) for c in s["cuda"]])


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
               {"written_by": "transfer-learning", "format": FORMAT,
                "files": {f: _sha256(os.path.join(ckpt, f)) for f in files},
                "sizes": {f: os.path.getsize(os.path.join(ckpt, f)) for f in files}})


def _complete_checkpoints(root):
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if d.startswith("step-") and os.path.isfile(os.path.join(root, d, MANIFEST)))


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainState, model: nn.Module,
                    optimizer: torch.optim.Optimizer, *, total_limit: int,
                    extra: Optional[dict] = None) -> str:
    """All ranks (each writes its RNG states; the main one the rest) into a temporary folder,
    then (main) a manifest, an atomic rename to checkpoints/step-N, the `latest` pointer, and
    pruning to the last `total_limit`. A kill at any point leaves `latest` naming a complete
    checkpoint. `state.train_sums` must already hold the sums over all processes. `extra`:
    more state dicts by name (e.g. the EMA), saved as NAME.safetensors."""
    root = os.path.join(output_dir, CHECKPOINTS)
    name = f"step-{state.step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    write_json(os.path.join(tmp, f"rng-{accelerator.process_index}.json"), _rng_state())
    if accelerator.is_main_process:
        save_file(cpu_state_dict(bare_model(accelerator, model)),
                  os.path.join(tmp, "model.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        for name, extra_state in (extra or {}).items():
            save_file(cpu_state_dict(extra_state), os.path.join(tmp, f"{name}.safetensors"))
        scaler = accelerator.scaler.state_dict() if accelerator.scaler else None
        write_json(os.path.join(tmp, "train_state.json"),
                   dict(format=FORMAT, train_state=dataclasses.asdict(state), scaler=scaler))
        best = os.path.join(output_dir, "best")
        if os.path.isdir(best):  # best/ as of now: a resume restores it
            os.makedirs(os.path.join(tmp, "best"))
            for f in sorted(set(os.listdir(best)) & BEST_FILES):  # not a stray temp file
                link_or_copy(os.path.join(best, f), os.path.join(tmp, "best", f))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(tmp)
        replace_dir(tmp, final)  # a folder of this name left by an abandoned run is replaced
        write_text(os.path.join(root, "latest"), name + "\n")
        for stale in os.listdir(root):  # leftovers of saves that were killed
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        done = _complete_checkpoints(root)
        for old in done[:-total_limit] if total_limit else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- loading ------------------------------------------------------------------------------

def resolve_checkpoint(arg: str, output_dir: str) -> str:
    """The checkpoint folder for `--resume-from-checkpoint latest|PATH`."""
    if arg != "latest":
        path = arg
    else:
        root = os.path.join(output_dir, CHECKPOINTS)
        pointer = read_regular_file(root, "latest", max_size=64)  # None: no folder, no file
        name = pointer.decode("utf-8", "replace").strip() if pointer else None
        if not name or not STEP_NAME.fullmatch(name) or \
                not os.path.isfile(os.path.join(root, name, MANIFEST)):
            done = _complete_checkpoints(root)  # the pointer is written last: fall back
            name = done[-1] if done else None
        if name is None:
            raise UserError(f"--resume-from-checkpoint latest: no checkpoint in {root}; "
                            "start the run without it")
        path = os.path.join(root, name)
    if not os.path.isdir(path):
        raise UserError(f"--resume-from-checkpoint {path}: no such folder")
    return path


@dataclass
class Checkpoint:
    """A checkpoint read, checked and parsed, not yet applied to anything."""

    path: str
    state: TrainState
    model: dict
    optimizer: dict
    scaler: Optional[dict]
    rng: dict            # process index -> RNG state
    best: dict           # file name -> bytes of best/
    extra: dict = field(default_factory=dict)  # name -> state dict (e.g. "ema")


class DamagedCheckpoint(RunFailure):
    """A checkpoint whose files are missing, changed or unreadable: what a crash, a full
    disk or a half-copied folder leaves (`latest` then falls back to the one before)."""


def _refuse(path, rel, why, damaged=True):
    error = (DamagedCheckpoint if damaged else RunFailure)(
        f"--resume-from-checkpoint {path}: {rel} {why}; refusing this checkpoint (pick "
        "another one, or start without it)")
    error.reason = f"{rel} {why}"  # for load_checkpoint's one-line fallback
    return error


MANIFEST_MAX_BYTES = 16 << 20  # names and digests of a few dozen files: far below this


def read_checkpoint(path: str, keep_best: bool = True) -> Checkpoint:
    """Read every file of a checkpoint once, check it against the manifest, parse it with a
    parser that cannot run code (JSON, safetensors, torch.load weights_only=True).
    `keep_best`: keep the bytes of best/ (the main process restores it); other processes
    only check them, so that every process takes or refuses the same checkpoint."""
    try:
        data = read_regular_file(path, MANIFEST, max_size=MANIFEST_MAX_BYTES)
        if data is False:
            raise ValueError("not a regular file of a manifest's size")
        manifest = json.loads(data.decode("utf-8"))
        files, sizes = manifest["files"], manifest.get("sizes", {})
        assert isinstance(files, dict) and isinstance(sizes, dict) and \
            manifest.get("format") == FORMAT
    except (AttributeError, ValueError, KeyError, TypeError, AssertionError, RecursionError):
        raise DamagedCheckpoint(f"--resume-from-checkpoint {path}: not a checkpoint written "
                                f"by these scripts (no valid {MANIFEST} of format {FORMAT})"
                                ) from None
    raw = {}
    for rel, digest in files.items():
        if _checked_name(rel) is None:
            raise _refuse(path, repr(rel)[:120], "is not a file name a checkpoint holds",
                          damaged=False)  # made, not damaged: never fall back past it
        size = sizes.get(rel)
        if size is not None and (not isinstance(size, int) or size < 0):
            raise _refuse(path, MANIFEST, f"declares no valid size for {rel}")
        raw[rel] = read_regular_file(path, rel, size)
        if raw[rel] is None:
            raise _refuse(path, rel, "is missing")
        if raw[rel] is False:
            raise _refuse(path, rel, "is a link or not a regular file")
        if raw[rel] is SIZE_DIFFERS:  # refused unread: no file is read past its size
            raise _refuse(path, rel, "changed since it was written")
        if not isinstance(digest, str) or hashlib.sha256(raw[rel]).hexdigest() != digest:
            raise _refuse(path, rel, "changed since it was written")
        if rel.startswith("best/") and not keep_best:
            raw[rel] = b""  # checked; not held (the predictions file can be large)

    def parse(rel, kind):
        if rel not in raw:
            raise _refuse(path, rel, "is missing")
        try:
            if kind == "json":
                return json.loads(raw[rel].decode("utf-8"))
            if kind == "safetensors":
                return load_safetensors_bytes(raw[rel])
            with warnings.catch_warnings():  # a pickle of another protocol gets a warning
                # above our own one-line verdict (refused or not): not the user's to act on
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return torch.load(io.BytesIO(raw[rel]), map_location="cpu", weights_only=True)
        except Exception as e:  # the parsers' own errors, e.g. an UnpicklingError
            # its bytes are the ones the manifest names: made so, not cut short by a crash,
            # so `latest` does not fall back past it
            raise _refuse(path, rel, f"is not a valid {kind} file "
                                     f"({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                          damaged=False)

    doc = parse("train_state.json", "json")
    if not isinstance(doc, dict) or not isinstance(doc.get("train_state"), dict):
        raise _refuse(path, "train_state.json", "holds no train state")
    rng, best, extra = {}, {}, {}
    for rel in list(raw):
        if "/" not in rel and rel.endswith(".safetensors") and rel != "model.safetensors":
            extra[rel[:-len(".safetensors")]] = parse(rel, "safetensors")
        elif rel.startswith("rng-") and rel.endswith(".json"):
            rng[int(rel[4:-5])] = parse(rel, "json")
        elif rel.startswith("best/") and keep_best:
            if rel.endswith(".json"):
                parse(rel, "json")
            elif rel.endswith(".safetensors"):
                parse(rel, "safetensors")
            best[rel[5:]] = raw.pop(rel)
    if keep_best and best and PREDICTIONS not in best:  # older: predictions in the state
        legacy = legacy_predictions(doc["train_state"].get("best"))
        if legacy is not None:
            best[PREDICTIONS] = save_safetensors_bytes(legacy)  # restored into best/ as now
    try:
        state = TrainState.from_dict(doc["train_state"])
    except (AttributeError, TypeError, ValueError, KeyError) as e:
        raise _refuse(path, "train_state.json", f"holds a train state of another shape "
                      f"({type(e).__name__})") from None
    return Checkpoint(path=path, state=state,
                      model=parse("model.safetensors", "safetensors"),
                      optimizer=parse("optimizer.pt", "torch"), scaler=doc.get("scaler"),
                      rng=rng, best=best, extra=extra)


def load_checkpoint(arg: str, output_dir: str, keep_best: bool = True) -> Checkpoint:
    """The checkpoint named by `--resume-from-checkpoint arg`, read and checked. For `latest`,
    a newest checkpoint that fails its digests (a crash or a full disk cut it short after
    the pointer moved) is passed over for the one before it, saying so in one line; a
    checkpoint named by its path is taken or refused as it is."""
    first = resolve_checkpoint(arg, output_dir)
    if arg != "latest":
        return read_checkpoint(first, keep_best)
    root = os.path.join(output_dir, CHECKPOINTS)
    candidates = [first] + [os.path.join(root, d) for d in reversed(_complete_checkpoints(root))
                            if os.path.join(root, d) != first]
    for i, path in enumerate(candidates):
        try:
            return read_checkpoint(path, keep_best)
        except DamagedCheckpoint as e:
            if i + 1 == len(candidates):
                raise
            reason = getattr(e, "reason", f"no valid {MANIFEST}")
            logger.warning(f"{os.path.basename(path)} is damaged ({reason}); resuming from "
                           f"the checkpoint before it, {os.path.basename(candidates[i + 1])}")


def set_aside_later_checkpoints(output_dir: str, step: int) -> None:
    """Main process, on resume: checkpoints after `step` belong to the run being abandoned;
    move them to checkpoints/abandoned/ so `latest` and pruning only see the new run."""
    root = os.path.join(output_dir, CHECKPOINTS)
    later = [d for d in _complete_checkpoints(root) if int(d.split("-")[1]) > step]
    if not later:
        return
    dest = os.path.join(root, "abandoned", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(dest, exist_ok=True)
    for d in later:
        os.replace(os.path.join(root, d), os.path.join(dest, d))
    logger.info(f"resuming at step {step}: moved the later checkpoints of the abandoned run "
                f"({', '.join(later)}) to {dest}")


def restore_best(output_dir: str, ckpt: Checkpoint) -> None:
    """Main process: best/ as it was when the checkpoint was taken (or none). Only the
    checked names of read_checkpoint are written, each inside <output_dir>/best."""
    best = os.path.join(output_dir, "best")
    if not ckpt.best:
        shutil.rmtree(best, ignore_errors=True)
        return
    tmp = os.path.join(output_dir, ".tmp-best")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    usual_mode(tmp, directory=True)
    for name, data in ckpt.best.items():
        if name not in BEST_FILES:  # read_checkpoint let none through; never write one
            raise _refuse(ckpt.path, f"best/{name!r}"[:120], "is not a file name best/ holds")
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(data)
    replace_dir(tmp, best)


def _optimizer_kind(state_dict):
    """'adamw' or 'sgd', told by the hyper-parameters an optimiser's state dict records."""
    return "adamw" if "betas" in state_dict["param_groups"][0] else "sgd"


def check_optimizer(ckpt: Checkpoint, ours: str) -> None:
    """Torch would load another optimiser's state, then fail at the first step on a missing
    key. Raises UserError naming the flag."""
    saved = _optimizer_kind(ckpt.optimizer)
    if saved != ours:
        raise UserError(f"--resume-from-checkpoint {ckpt.path}: it holds {saved}'s state and "
                        f"this run trains with {ours}: resume with --optimizer {saved}")


def apply_checkpoint(accelerator: Accelerator, ckpt: Checkpoint, model: nn.Module,
                     optimizer: torch.optim.Optimizer) -> None:
    """Load the parsed tensors into the (prepared) model and optimiser, and the scaler. The
    gradient-accumulation counter restarts: checkpoints are only taken right after an
    optimiser step."""
    bare_model(accelerator, model).load_state_dict(ckpt.model)
    check_optimizer(ckpt, _optimizer_kind(optimizer.state_dict()))
    optimizer.load_state_dict(ckpt.optimizer)
    if accelerator.scaler is not None and ckpt.scaler:
        accelerator.scaler.load_state_dict(ckpt.scaler)
    accelerator.step = 0


def restore_rng(accelerator: Accelerator, ckpt: Checkpoint, seed: int) -> None:
    """This process's RNG states as saved (a process the checkpoint did not have keeps the
    per-rank seed instead)."""
    rng = ckpt.rng.get(accelerator.process_index)
    if rng is not None:
        _set_rng_state(rng)
    else:
        seed_for_training(accelerator, seed + ckpt.state.step)


class CheckpointPolicy:
    """When a run saves (--checkpointing-steps: every N optimiser steps, at each epoch's end,
    or only when stopped), and each position once: a step checkpoint that falls on the
    epoch's end (or a stop) is not written twice."""

    def __init__(self, cfg: TrainConfig, output_dir: str):
        self.every, self.limit = cfg.checkpointing_steps, cfg.checkpoints_total_limit
        self.batch_size = cfg.batch_size
        self.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self.output_dir = output_dir
        self.saved_at, self.path = None, None  # the last checkpoint this run wrote

    def due_at(self, step: int) -> bool:
        """A step checkpoint is due after optimiser step `step`."""
        return self.every.isdigit() and step % int(self.every) == 0

    @property
    def at_epoch_end(self) -> bool:
        return self.every == "epoch"

    @property
    def mid_epoch(self) -> bool:
        """A time box (--max-train-steps) inside an epoch saves its place, unless 'no'."""
        return self.every != "no"

    def save(self, accelerator: Accelerator, state: TrainState, model: nn.Module,
             optimizer: torch.optim.Optimizer, *, ema: Optional[ModelEma] = None,
             wall_seconds: float = 0.0) -> str:
        """All ranks: the checkpoint of `state` (its sums already over all processes)."""
        position = (state.step, state.epoch, state.batches_done)
        if self.saved_at == position:
            return self.path
        state.wall_seconds = wall_seconds
        state.num_processes = accelerator.num_processes
        state.batch_size = self.batch_size
        state.gradient_accumulation_steps = self.gradient_accumulation_steps
        if ema is not None:
            ema.sync(accelerator)  # every rank saves rank 0's average
            state.ema_updates = ema.updates
        self.path = save_checkpoint(accelerator, self.output_dir, state, model, optimizer,
                                    total_limit=self.limit,
                                    extra={"ema": ema.state_dict()} if ema else None)
        self.saved_at = position
        return self.path
