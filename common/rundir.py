"""The run folder: chosen once for all processes, never written over by accident."""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import TYPE_CHECKING

from accelerate.utils import broadcast_object_list

from common.errors import UserError
from common.log import logger


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import PartialState
    from common.config import TrainConfig

RUN_FILES = ("results.json", "metrics.jsonl", "best", "checkpoints")  # what a run writes
# also replaced by --overwrite-output-dir (alone they do not make a folder "a run": a run that
# stopped at a bad flag or a missing image leaves a train.log, and may be started again there)
_ALSO_REPLACED = ("summary.csv", "train.log")


def check_output_dir(cfg: TrainConfig, output_dir: str, is_main: bool) -> None:
    """Never train over an earlier run by accident, and never delete what we did not write.
    Every rank checks (so all stop together); the main one deletes."""
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if not found or cfg.resume_from_checkpoint:
        return
    if not cfg.overwrite_output_dir:
        what = "a finished run" if "results.json" in found else "an unfinished run"
        hint = ("" if "results.json" in found
                else "--resume-from-checkpoint latest to continue it, or ")
        raise UserError(f"--output-dir {output_dir} already holds {what} ({', '.join(found)}); "
                        f"use {hint}--overwrite-output-dir to replace it, or another folder")
    if not is_main:
        return
    for f in found + [f for f in _ALSO_REPLACED if os.path.exists(os.path.join(output_dir, f))]:
        path = os.path.join(output_dir, f)  # only our own files; anything else stays
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    logger.info(f"--overwrite-output-dir: removed {', '.join(found)} from {output_dir}")


def run_name(cfg: TrainConfig, script: str) -> str:
    """<script>-<model>-<data>: what a run folder holds, readable in a listing (the model as
    its architecture's name, the data as its folder's or dataset's last name)."""
    from common.pretrained import ALIASES

    library, sep, arch = cfg.model.partition(":")  # timm:NAME, torchvision:NAME, hf-hub:ORG/NAME
    model = arch if sep and library in ("timm", "torchvision", "hf-hub") else cfg.model
    model = ALIASES.get(model, model).rsplit("/", 1)[-1]
    source = cfg.data_dir or cfg.dataset
    data = os.path.basename(os.path.normpath(source)) if source else "hymenoptera_data"
    parts = [re.sub(r"[^A-Za-z0-9._]+", "_", p).strip("._") for p in (script, model, data)]
    return "-".join(p for p in parts if p)


def choose_output_dir(cfg: TrainConfig, script: str, state: PartialState) -> str:
    """The run folder: --output-dir, or outputs/<script>-<model>-<data>-<time> as the main
    process reads the clock (other ranks may read it a second later)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    chosen = [cfg.output_dir or os.path.join("outputs", f"{run_name(cfg, script)}-{stamp}")]
    if state.num_processes > 1:
        broadcast_object_list(chosen)
    return chosen[0]
