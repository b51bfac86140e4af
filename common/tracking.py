"""Experiment tracking through Accelerate's trackers (W&B by default, TensorBoard, or none).

Only the main process creates a run (Accelerate's trackers are main-process-only), so a
2-process job is one W&B run. With no W&B account (no WANDB_API_KEY, no `wandb login`) and
no WANDB_MODE set, W&B would prompt on a terminal or fail without one: we run it offline
instead and say so in one line; `wandb sync <run folder>/wandb/offline-run-*` uploads later.
"""

import netrc
import os
import sys
from urllib.parse import urlparse


def _wandb_has_account():
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_report_to(report_to, is_main_process):
    """The `log_with` argument for Accelerator; sets W&B offline when there is no account."""
    if report_to == "none":
        return None
    if report_to == "wandb" and not os.environ.get("WANDB_MODE") and not _wandb_has_account():
        os.environ["WANDB_MODE"] = "offline"  # every rank: only the main one starts a run
        if is_main_process:
            print("W&B: no account configured (WANDB_API_KEY / `wandb login`), logging offline; "
                  "upload later with `wandb sync`", file=sys.stderr)
    return report_to


def start_run(accelerator, cfg, config, output_dir, job_type, resume_id=None):
    """Start the tracker run (main process) with the resolved config; `resume_id` continues
    an earlier run (W&B: same id, resume="allow")."""
    if not accelerator.log_with:
        return
    init_kwargs = {}
    if cfg.report_to == "wandb":
        init_kwargs["wandb"] = dict(dir=output_dir, job_type=job_type,
                                    name=cfg.run_name or os.path.basename(output_dir))
        if resume_id:
            init_kwargs["wandb"].update(id=resume_id, resume="allow")
    # TensorBoard writes under the Accelerator's project_dir (the run folder); its hparams
    # take no None values.
    config = {k: ("" if v is None else v) for k, v in config.items()}
    accelerator.init_trackers(cfg.project, config=config, init_kwargs=init_kwargs)


def tracker_run_id(accelerator):
    """The W&B run id on the main process (saved in checkpoints), else None."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "wandb":
            return tracker.tracker.id
    return None


def set_summary(accelerator, values):
    """Final numbers of the run: W&B summary (TensorBoard already has the curves)."""
    if accelerator.is_main_process and accelerator.log_with:
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                tracker.tracker.summary.update(values)
