"""Experiment tracking through Accelerate's trackers (W&B by default, TensorBoard, or none).

Only the main process creates a run (Accelerate's trackers are main-process-only), so a
2-process job is one W&B run. With no W&B account (no WANDB_API_KEY, no `wandb login`) and
no WANDB_MODE set, W&B would prompt on a terminal or fail without one: we run it offline
instead and say so in one line; `wandb sync <run folder>/wandb/offline-run-*` uploads later.
"""

from __future__ import annotations

import netrc
import os
import platform
import subprocess
from urllib.parse import urlparse
from typing import Optional, TYPE_CHECKING

from common.log import logger


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig


def _wandb_has_account():
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_report_to(report_to: str, is_main_process: bool) -> Optional[str]:
    """The `log_with` argument for Accelerator; sets W&B offline when there is no account."""
    if report_to == "none":
        return None
    if report_to == "wandb" and not os.environ.get("WANDB_MODE") and not _wandb_has_account():
        os.environ["WANDB_MODE"] = "offline"  # every rank: only the main one starts a run
        if is_main_process:
            logger.info("W&B: no account configured (WANDB_API_KEY / `wandb login`), logging "
                        "offline; upload later with `wandb sync`")
    return report_to


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata() -> dict:
    """Library versions and the code's git commit, for comparing runs."""
    import accelerate
    import datasets
    import timm
    import torch
    import torchvision

    return dict(git_commit=_git_commit(), torch_version=torch.__version__,
                torchvision_version=torchvision.__version__, timm_version=timm.__version__,
                accelerate_version=accelerate.__version__, datasets_version=datasets.__version__,
                python_version=platform.python_version())


def default_group(cfg: TrainConfig) -> str:
    """Runs on the same data with the same backbone group together: fine-tune vs extractor,
    1 vs N GPUs."""
    data = cfg.dataset or os.path.basename(os.path.normpath(cfg.data_dir or "hymenoptera_data"))
    return f"{data}/{cfg.model}"


def start_run(accelerator: Accelerator, cfg: TrainConfig, config: dict, output_dir: str, *,
              script: str, resume_id: Optional[str] = None) -> None:
    """Start the tracker run (main process) with the resolved config; `resume_id` continues
    an earlier run (W&B: same id, resume="allow")."""
    if not accelerator.log_with:
        return
    init_kwargs = {}
    if cfg.report_to == "wandb":
        init_kwargs["wandb"] = dict(dir=output_dir, job_type=script,
                                    name=cfg.run_name or os.path.basename(output_dir),
                                    group=cfg.group or default_group(cfg),
                                    tags=[t for t in (cfg.tags or "").split(",") if t])
        if resume_id:
            init_kwargs["wandb"].update(id=resume_id, resume="allow")
    # TensorBoard writes under the Accelerator's project_dir (the run folder); its hparams
    # take no None values.
    config = {k: ("" if v is None else v) for k, v in {**config, **run_metadata()}.items()}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=init_kwargs)
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "wandb":
            # Charts against our optimiser step, which a resumed run repeats from its
            # checkpoint on; W&B's own step only ever grows, so nothing logged after a
            # resume is dropped as "already passed" (see log_metrics).
            tracker.tracker.define_metric("train/step")
            tracker.tracker.define_metric("*", step_metric="train/step")


def log_metrics(accelerator: Accelerator, values: dict, step: int) -> None:
    """Scalars to every tracker (main process). W&B gets no explicit step: it would ignore
    rows at a step it has passed, which every resumed run revisits; `values` carries
    `train/step`, its x-axis. TensorBoard plots against `step` and keeps repeats."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        tracker.log(values, step=None if tracker.name == "wandb" else step)


def log_pictures(accelerator: Accelerator, pngs: dict, step: int) -> None:
    """PNG files (name -> path) to the trackers: wandb.Image, or a TensorBoard image."""
    import numpy as np
    from PIL import Image

    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        images = {k: Image.open(v).convert("RGB") for k, v in pngs.items()}
        if tracker.name == "wandb":  # no explicit step: see log_metrics
            import wandb

            tracker.tracker.log({**{k: wandb.Image(v) for k, v in images.items()},
                                 "train/step": step})
        elif tracker.name == "tensorboard":
            tracker.log_images({k: np.asarray(v)[None] for k, v in images.items()}, step=step,
                               dataformats="NHWC")


def tracker_run_id(accelerator: Accelerator) -> Optional[str]:
    """The W&B run id on the main process (saved in checkpoints), else None."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "wandb":
            return tracker.tracker.id
    return None


def set_summary(accelerator: Accelerator, values: dict) -> None:
    """Final numbers of the run: W&B summary (TensorBoard already has the curves)."""
    if accelerator.is_main_process and accelerator.log_with:
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                tracker.tracker.summary.update(values)
