"""Checkpoints and resume: a killed run, resumed, ends exactly where an uninterrupted one does."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from common.checkpoint import resolve_checkpoint
from common.errors import UserError
from conftest import CONFIGS, REPO, launch, make_image_folder

ARGS = ["--model", "timm:test_resnet", "--no-pretrained", "--batch-size", "4",
        "--num-workers", "1", "--epochs", "6", "--checkpointing-steps", "2",
        "--report-to", "none", "--seed", "7"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "data")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory, offline_env):
    out = tmp_path_factory.mktemp("full") / "run"
    launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", out], offline_env)
    return json.load(open(out / "results.json")), out


def _latest_step(out):
    try:
        return int(open(os.path.join(out, "checkpoints", "latest")).read().split("-")[1])
    except (OSError, IndexError, ValueError):
        return -1


def start_and_interrupt(args, out, env, sig, after_step):
    """Launch train_finetune.py with `args`, send `sig` to its process group once a checkpoint
    at or after `after_step` exists; return (exit code, output)."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    proc = subprocess.Popen(
        [accelerate, "launch", "--config_file", os.path.join(CONFIGS, "cpu.yaml"),
         os.path.join(REPO, "train_finetune.py"), *map(str, args), "--output-dir", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group: the launcher and its worker
    deadline = time.time() + 300
    while _latest_step(out) < after_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()
    os.killpg(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


def test_kill_9_mid_epoch_then_resume_latest_matches_uninterrupted(
        data, uninterrupted, tmp_path, offline_env):
    full, _ = uninterrupted
    out = tmp_path / "run"
    # 18 images / batch 4 = 5 steps per epoch: step 8 is in the middle of epoch 2
    start_and_interrupt(["--data-dir", data, *ARGS], out, offline_env, signal.SIGKILL,
                        after_step=8)
    assert not (out / "results.json").exists()
    proc = launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", out,
                                        "--resume-from-checkpoint", "latest"], offline_env)
    assert "Resuming from" in proc.stdout
    res = json.load(open(out / "results.json"))
    for key in ("final_val_accuracy", "best_val_accuracy", "best_epoch", "optimizer_steps",
                "best_confusion_matrix"):
        assert res[key] == full[key], key
    assert res["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]  # no duplicated epochs


def test_sigterm_saves_a_checkpoint_and_exits_with_a_message(data, uninterrupted, tmp_path,
                                                             offline_env):
    full, _ = uninterrupted
    out = tmp_path / "run"
    code, output = start_and_interrupt(["--data-dir", data, *ARGS], out, offline_env,
                                       signal.SIGTERM, after_step=4)
    assert code != 0
    assert "Stopped by SIGTERM: saved" in output and "--resume-from-checkpoint latest" in output
    launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", out,
                                  "--resume-from-checkpoint", "latest"], offline_env)
    res = json.load(open(out / "results.json"))
    assert res["final_val_accuracy"] == full["final_val_accuracy"]
    assert res["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)


def test_keeps_only_the_last_checkpoints(uninterrupted):
    _, out = uninterrupted
    names = sorted(d for d in os.listdir(out / "checkpoints") if d.startswith("step-"))
    assert names == ["step-00000028", "step-00000030"]  # 6 epochs x 5 steps, every 2, keep 2
    assert open(out / "checkpoints" / "latest").read().strip() == "step-00000030"


def test_a_save_killed_halfway_leaves_latest_loadable(uninterrupted, tmp_path):
    _, out = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    # what a kill during the next save leaves: a temporary folder, no manifest, pointer not
    # yet moved, or moved to a folder whose files were cut short
    partial = run / "checkpoints" / ".tmp-step-00000032"
    shutil.copytree(run / "checkpoints" / "step-00000030", partial)
    os.remove(partial / "manifest.json")
    assert resolve_checkpoint("latest", str(run)).endswith("step-00000030")
    (run / "checkpoints" / "latest").write_text("step-00000032\n")
    assert resolve_checkpoint("latest", str(run)).endswith("step-00000030")


def test_resume_refuses_folders_it_did_not_write(uninterrupted, tmp_path):
    _, out = uninterrupted
    foreign = tmp_path / "foreign"
    shutil.copytree(out / "checkpoints" / "step-00000030", foreign)
    os.remove(foreign / "manifest.json")
    with pytest.raises(UserError, match="not a checkpoint written by these scripts"):
        resolve_checkpoint(str(foreign), str(tmp_path))
    tampered = tmp_path / "tampered"
    shutil.copytree(out / "checkpoints" / "step-00000030", tampered)
    with open(tampered / "random_states_0.pkl", "ab") as fh:
        fh.write(b"code")
    with pytest.raises(UserError, match="random_states_0.pkl is missing or changed"):
        resolve_checkpoint(str(tampered), str(tmp_path))
    with pytest.raises(UserError, match="no checkpoint in"):
        resolve_checkpoint("latest", str(tmp_path / "nothing"))


def test_two_process_run_is_one_wandb_run_and_resume_reuses_its_id(data, tmp_path,
                                                                   offline_env):
    out = tmp_path / "run"
    args = ["--data-dir", data, "--model", "timm:test_resnet", "--no-pretrained",
            "--batch-size", "4", "--num-workers", "0", "--output-dir", out,
            "--checkpointing-steps", "epoch", "--checkpoints-total-limit", "0"]
    launch("train_extractor.py", [*args, "--epochs", "2"], offline_env, nproc=2)
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    run_id = runs[0].rsplit("-", 1)[1]
    first = sorted(glob.glob(str(out / "checkpoints" / "step-*")))[0]  # after epoch 1
    launch("train_extractor.py", [*args, "--epochs", "2", "--resume-from-checkpoint", first],
           offline_env, nproc=2)
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and {r.rsplit("-", 1)[1] for r in runs} == {run_id}
