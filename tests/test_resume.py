"""Checkpoints and resume: a killed run, resumed, ends exactly where an uninterrupted one does."""

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoint import read_checkpoint, resolve_checkpoint
from common.errors import UserError
from conftest import CONFIGS, REPO, launch, make_image_folder

ARGS = ["--model", "timm:test_resnet", "--no-pretrained", "--batch-size", "4",
        "--num-workers", "1", "--epochs", "6", "--checkpointing-steps", "2",
        "--report-to", "none", "--seed", "7", "--patience", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("d") / "data")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory, offline_env):
    out = tmp_path_factory.mktemp("full") / "run"
    launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", out], offline_env)
    return json.load(open(out / "results.json")), out


def assert_ends_as_uninterrupted(out, full):
    """The run in `out` ended as the uninterrupted one: the same final and best metrics and
    steps, and one metrics row per epoch (0: the probe), none left over or partial."""
    res = json.load(open(out / "results.json"))
    for key in ("final_val_accuracy", "best_val_accuracy", "best_epoch", "optimizer_steps",
                "best_confusion_matrix"):
        assert res[key] == full[key], key
    assert res["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert not any(r.get("partial") for r in rows)


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


@pytest.mark.launch
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
    assert_ends_as_uninterrupted(out, full)


@pytest.mark.launch
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


@pytest.mark.launch
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
        read_checkpoint(str(foreign))
    tampered = tmp_path / "tampered"
    shutil.copytree(out / "checkpoints" / "step-00000030", tampered)
    with open(tampered / "rng-0.json", "a") as fh:
        fh.write(" ")
    with pytest.raises(UserError, match="rng-0.json changed since it was written"):
        read_checkpoint(str(tampered))
    with pytest.raises(UserError, match="no checkpoint in"):
        resolve_checkpoint("latest", str(tmp_path / "nothing"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_manifest(ckpt):
    """What anyone can do: make the manifest match whatever the folder now holds."""
    import hashlib

    manifest = json.load(open(ckpt / "manifest.json"))
    for rel in manifest["files"]:
        manifest["files"][rel] = hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
        manifest["sizes"][rel] = (ckpt / rel).stat().st_size
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_file_replaced_by_a_code_running_pickle_is_refused_never_run(
        uninterrupted, tmp_path):
    import pickle

    _, out = uninterrupted
    real = out / "checkpoints" / "step-00000030"
    files = [str(p.relative_to(real)) for p in real.rglob("*") if p.is_file()]
    replaceable = [f for f in files if not f.endswith(".safetensors") and f != "manifest.json"]
    assert {"optimizer.pt", "train_state.json", "rng-0.json", "best/model.json"} <= \
        set(replaceable)
    assert read_checkpoint(str(real)).state.step == 30  # untouched, it loads
    for rel in replaceable:
        ckpt = tmp_path / rel.replace("/", "_")
        shutil.copytree(real, ckpt)
        marker = tmp_path / f"ran-{rel.replace('/', '_')}"
        with open(ckpt / rel, "wb") as fh:
            pickle.dump(_Evil(marker), fh)  # torch.save would pickle it the same way
        _rewrite_manifest(ckpt)
        with pytest.raises(UserError, match=f"{rel} is not a valid"):
            read_checkpoint(str(ckpt))
        assert not marker.exists(), f"{rel}: its code ran"


def test_resume_with_a_poisoned_optimizer_file_exits_with_one_line(data, uninterrupted,
                                                                    tmp_path, offline_env):
    import pickle

    _, out = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "step-00000030"
    marker = tmp_path / "ran"
    with open(ckpt / "optimizer.pt", "wb") as fh:
        pickle.dump(_Evil(marker), fh)
    _rewrite_manifest(ckpt)
    proc = launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", run,
                                        "--resume-from-checkpoint", "latest"], offline_env,
                  check=False)
    assert proc.returncode == 1 and not marker.exists()  # a refused checkpoint: a failure
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optimizer.pt is not a valid torch file" in errors[0], proc.stderr


def test_resuming_with_another_optimizer_exits_with_one_line_naming_the_flag(
        data, uninterrupted, tmp_path, offline_env):
    """A run started with AdamW (the default) resumed with --optimizer sgd: torch would load
    the state, then fail deep in the first step (or a run from before the default changed,
    resumed without the flag)."""
    _, out = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    proc = launch("train_finetune.py", ["--data-dir", data, *ARGS, "--optimizer", "sgd",
                                        "--output-dir", run, "--resume-from-checkpoint",
                                        "latest"], offline_env, check=False)
    assert proc.returncode == 2  # the flags do not fit the checkpoint: a usage error
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resume with --optimizer adamw" in errors[0], proc.stderr
    assert "KeyError" not in proc.stderr  # (the launcher adds a traceback of its own)


def _steps(root):
    return sorted(d for d in os.listdir(root) if d.startswith("step-"))


def test_resuming_an_older_checkpoint_twice_moves_latest_and_best_with_the_new_run(
        data, uninterrupted, tmp_path, offline_env):
    full, _ = uninterrupted
    args = ["--data-dir", data, *ARGS, "--checkpoints-total-limit", "0"]
    out = tmp_path / "run"
    launch("train_finetune.py", [*args, "--output-dir", out], offline_env)
    root = out / "checkpoints"
    assert _steps(root)[-1] == "step-00000030" and len(_steps(root)) == 15
    for resume_at in ("step-00000012", "step-00000018"):  # the second resume: of the new run
        old_latest = (root / "step-00000030").stat().st_mtime_ns
        launch("train_finetune.py", [*args, "--output-dir", out, "--resume-from-checkpoint",
                                     str(root / resume_at)], offline_env)
        # the abandoned later checkpoints were set aside, the new run's written in their place
        assert open(root / "latest").read().strip() == "step-00000030"
        assert (root / "step-00000030").stat().st_mtime_ns > old_latest
        assert _steps(root)[-1] == "step-00000030"
        aside = sorted(p.name for p in (root / "abandoned").glob("*/step-*"))
        assert "step-00000030" in aside
        res = json.load(open(out / "results.json"))
        for key in ("final_val_accuracy", "best_val_accuracy", "best_epoch", "optimizer_steps"):
            assert res[key] == full[key], key
        meta = json.load(open(out / "best" / "model.json"))
        assert meta["epoch"] == res["best_epoch"]


def test_best_is_restored_to_what_it_was_at_the_checkpoint(uninterrupted, tmp_path):
    from common.checkpoint import restore_best

    _, out = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(out, run)
    ckpt = read_checkpoint(str(run / "checkpoints" / "step-00000028"))
    assert ckpt.best and ckpt.state.best is not None
    (run / "best" / "model.json").write_text('{"epoch": 99}')  # what a later run left
    restore_best(str(run), ckpt)
    meta = json.load(open(run / "best" / "model.json"))
    assert meta["epoch"] == ckpt.state.best.epoch != 99
    ckpt.best = {}
    restore_best(str(run), ckpt)  # a checkpoint taken before any evaluation: no best yet
    assert not (run / "best").exists()


def test_a_checkpoint_of_2_processes_resumes_on_1_or_refuses_clearly(data, tmp_path,
                                                                     offline_env):
    args = ["--data-dir", data, "--model", "timm:test_resnet", "--no-pretrained",
            "--batch-size", "4", "--num-workers", "0", "--epochs", "2",
            "--checkpointing-steps", "2", "--checkpoints-total-limit", "0",
            "--report-to", "none"]
    out = tmp_path / "run"
    launch("train_finetune.py", [*args, "--output-dir", out], offline_env, nproc=2)
    # 18 images, 2 x 4 per step: 3 steps per epoch; step 2 = 16 images into epoch 1
    ckpt = out / "checkpoints" / "step-00000002"
    resumed = tmp_path / "resumed"
    proc = launch("train_finetune.py", [*args, "--output-dir", resumed,
                                        "--resume-from-checkpoint", ckpt], offline_env)
    assert "on 1 x 4: epoch 1, batch 4/5, optimiser step 4" in proc.stdout
    rows = [json.loads(line) for line in open(resumed / "metrics.jsonl")]
    assert [r["train_samples"] for r in rows] == [18, 18]  # no image skipped or repeated
    res = json.load(open(resumed / "results.json"))
    assert res["optimizer_steps"] == 10 and res["num_processes"] == 1
    # 16 images are not a whole number of steps of 3: refused, naming what would work
    proc = launch("train_finetune.py", [*args[:5], "--batch-size", "3", *args[7:],
                                        "--output-dir", tmp_path / "refused",
                                        "--resume-from-checkpoint", ckpt], offline_env,
                  check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "epoch-end checkpoint" in errors[0], proc.stderr


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
    # the resumed run logs epoch 2 again, at optimiser step 6 (2 x 3 steps): W&B's own step
    # must keep growing (an explicit step it has passed is dropped when synced), and the
    # charts use train/step
    resumed = max(runs, key=os.path.getmtime)
    records = _records(resumed)
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert [h["_step"] for h in history] == list(range(len(history)))
    assert any(h.get("epoch") == 2 and h.get("train/step") == 6 for h in history)
    assert any(r.get("type") == "metric" and r["metric"].get("step_metric") == "train/step"
               for r in records)


def _records(run_dir):
    """Every record of an offline W&B run, through wandb's own reader."""
    exe = os.path.join(os.path.dirname(sys.executable), "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", run_dir], capture_output=True,
                         text=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _plant(ckpt, key, data):
    """Add a file under manifest key `key` (with its bytes where a naive join would read
    them) and rewrite the manifest to match, as anyone handing out a checkpoint can."""
    import hashlib

    target = os.path.join(str(ckpt), key)  # where os.path.join(ckpt, key) reads it
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as fh:
        fh.write(data)
    manifest = json.load(open(ckpt / "manifest.json"))
    manifest["files"][key] = hashlib.sha256(data).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_naming_files_outside_its_run_is_refused_and_nothing_is_written(
        data, uninterrupted, tmp_path, offline_env):
    """best/ keys that a naive join turns into a path outside the run (absolute, '..'), a
    symbolic link to a file elsewhere, and a `latest` pointing out of checkpoints/: each is
    refused with one line, and no file appears outside the run folder."""
    _, out = uninterrupted
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not the checkpoint's to read")
    planted = {
        "absolute": f"best//{outside}/bashrc",  # os.path.join(best, '/...') = '/...'
        "dotdot": "best/../../../outside/dotdot",
        "nested": "best/sub/model.json",
        "unknown top-level": "evil.safetensors",
    }
    for what, key in planted.items():
        run = tmp_path / what.replace(" ", "_")
        shutil.copytree(out / "checkpoints", run / "checkpoints")
        ckpt = run / "checkpoints" / "step-00000030"
        _plant(ckpt, key, b"#!/bin/sh\necho owned\n")
        with pytest.raises(UserError, match="is not a file name a checkpoint holds"):
            read_checkpoint(str(ckpt))
    # the whole script, as a user resumes: one error line, exit 1, nothing outside
    proc = launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir",
                                        tmp_path / "absolute", "--resume-from-checkpoint",
                                        "latest"], offline_env, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "is not a file name a checkpoint holds" in errors[0]
    assert os.listdir(outside) == []
    # a known name that is a symbolic link to a file elsewhere: not read
    run = tmp_path / "link"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "step-00000030"
    os.remove(ckpt / "best" / "config.json")
    os.symlink(secret, ckpt / "best" / "config.json")
    _rewrite_manifest(ckpt)
    with pytest.raises(UserError, match="best/config.json is a link or not a regular file"):
        read_checkpoint(str(ckpt))
    # best/ itself a link to another folder
    run = tmp_path / "linkdir"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    ckpt = run / "checkpoints" / "step-00000030"
    shutil.move(str(ckpt / "best"), str(outside / "best"))
    os.symlink(outside / "best", ckpt / "best")
    with pytest.raises(UserError, match="is a link or not a regular file"):
        read_checkpoint(str(ckpt))
    # `latest` naming a folder outside checkpoints/: not followed, the newest step instead
    run = tmp_path / "pointer"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    shutil.copytree(out / "checkpoints" / "step-00000028", tmp_path / "elsewhere")
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    assert resolve_checkpoint("latest", str(run)) == str(run / "checkpoints" /
                                                         "step-00000030")


def test_restore_best_writes_only_known_names_inside_the_run(uninterrupted, tmp_path):
    """Defence in depth: even a Checkpoint object built by other code cannot make
    restore_best write outside <run>/best."""
    from common.checkpoint import restore_best

    _, out = uninterrupted
    ckpt = read_checkpoint(str(out / "checkpoints" / "step-00000030"))
    assert set(ckpt.best) >= {"model.safetensors", "model.json"}
    target = tmp_path / "escaped"
    ckpt.best = {**ckpt.best, str(target): b"x"}
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="is not a file name best/ holds"):
        restore_best(str(run), ckpt)
    assert not target.exists()


def test_latest_cut_short_by_a_crash_falls_back_to_the_checkpoint_before_it(
        data, uninterrupted, tmp_path, offline_env):
    """A crash after `latest` moved but before the newest checkpoint's data reached the disk
    leaves it failing its digests: the resume says so in one line and continues from the
    checkpoint before it, ending where the uninterrupted run does. The torn last line of
    metrics.jsonl is read as cut off by the crash, not as a traceback."""
    full, out = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    rows = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(rows[:6]) + rows[6][:25])  # torn mid-row
    newest = run / "checkpoints" / "step-00000030"
    with open(newest / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    proc = launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", run,
                                        "--resume-from-checkpoint", "latest"], offline_env)
    assert ("warning: step-00000030 is damaged (model.safetensors changed since it was "
            "written); resuming from the checkpoint before it, step-00000028") in proc.stdout
    assert "cut off by the crash" in proc.stdout
    assert_ends_as_uninterrupted(run, full)
    # a checkpoint named by its path is not second-guessed: refused as it is
    with open(run / "checkpoints" / "step-00000030" / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(UserError, match="model.safetensors changed since it was written"):
        read_checkpoint(str(run / "checkpoints" / "step-00000030"))


def test_checkpoint_files_reach_the_disk_before_the_renames_that_publish_them(
        tmp_path, monkeypatch):
    """Crash safety: every file of a new folder and the file behind `latest` are fsync'ed
    before the rename that makes them visible, and the folder after it."""
    from common import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        ("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(
        ("replace", str(a), str(b))), real_replace(a, b))[1])
    tmp = tmp_path / ".tmp-step"
    (tmp / "best").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"weights")
    (tmp / "best" / "model.json").write_text("{}")
    files.replace_dir(str(tmp), str(tmp_path / "step"))
    files.write_text(str(tmp_path / "latest"), "step\n")
    moved = [i for i, e in enumerate(events) if e[0] == "replace" and e[2].endswith("step")]
    synced = {e[1]: i for i, e in enumerate(events) if e[0] == "fsync"}
    assert synced[str(tmp / "model.safetensors")] < moved[0]
    assert synced[str(tmp / "best" / "model.json")] < moved[0]
    assert synced[str(tmp / "best")] < moved[0]
    latest = next(i for i, e in enumerate(events) if e[0] == "replace" and
                  e[2].endswith("latest"))
    written = next(i for i, e in enumerate(events) if e[0] == "fsync" and
                   os.path.basename(e[1]).startswith(".tmp-"))
    assert written < latest
    assert any(e == ("fsync", str(tmp_path)) for e in events[latest:])  # the rename itself


def test_two_processes_resumed_mid_epoch_end_as_the_uninterrupted_run(tmp_path, offline_env):
    """2 processes, 21 images, global batch 8: 3 steps per epoch, the last batch padded
    with 3 repeated images. Resumed from the checkpoint taken mid-epoch (what a kill -9
    leaves behind), the run counts the same real samples in its train metrics and ends with
    the uninterrupted run's metrics and weights. (21, not 18: 18 % 8 == 18 % 4, which hid
    a loader resumed mid-epoch counting its remainder per process.)"""
    from safetensors.torch import load_file

    data = make_image_folder(tmp_path / "data", counts={"train": 7, "val": 3})
    args = ["--data-dir", data, "--model", "timm:test_resnet", "--no-pretrained",
            "--batch-size", "4", "--num-workers", "0", "--epochs", "2", "--seed", "3",
            "--checkpointing-steps", "1", "--checkpoints-total-limit", "0",
            "--report-to", "none", "--patience", "0"]
    full = tmp_path / "full"
    launch("train_finetune.py", [*args, "--output-dir", full], offline_env, nproc=2)
    run = tmp_path / "run"  # what the killed run left: its checkpoints and metrics rows
    shutil.copytree(full / "checkpoints", run / "checkpoints")
    shutil.copy(full / "metrics.jsonl", run / "metrics.jsonl")
    proc = launch("train_finetune.py", [*args, "--output-dir", run, "--resume-from-checkpoint",
                                        run / "checkpoints" / "step-00000004"], offline_env,
                  nproc=2)
    assert "epoch 2, batch 1, optimiser step 4" in proc.stdout
    want, got = ([json.loads(line) for line in open(out / "metrics.jsonl")]
                 for out in (full, run))
    assert [r["epoch"] for r in got] == [0, 1, 2]
    assert [r["train_samples"] for r in got[1:]] == [21, 21]
    for w, g in zip(want, got):
        for key in ("train_samples", "train_accuracy", "val_accuracy", "val_samples"):
            assert g.get(key) == w.get(key), (key, w["epoch"])
        for key in ("train_loss", "val_loss"):
            if w.get(key) is None:  # epoch 0 (the probe's model) trains nothing
                assert g.get(key) is None
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-5), (key, w["epoch"])
    a, b = (load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
            for out in (full, run))
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6) for k in a)


def test_a_time_box_keeps_its_place_in_the_epoch_and_resumes_as_the_uninterrupted_run(
        data, uninterrupted, tmp_path, offline_env):
    """--max-train-steps 7 stops 2 batches into epoch 2 (5 steps per epoch): its metrics row
    says partial, its checkpoint keeps the position (not 'epoch 2 done'), and the run
    resumed without the time box ends exactly as the uninterrupted one."""
    full, _ = uninterrupted
    out = tmp_path / "run"
    proc = launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", out,
                                        "--max-train-steps", "7"], offline_env)
    assert "(partial: batch 2/5)" in proc.stdout
    boxed = json.load(open(out / "results.json"))
    assert boxed["optimizer_steps"] == 7
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["epoch"], r.get("partial", False)) for r in rows] == \
        [(0, False), (1, False), (2, True)]
    assert rows[-1]["train_samples"] == 8  # the 2 batches of 4 trained in epoch 2
    state = json.load(open(out / "checkpoints" / "step-00000007" / "train_state.json"))
    assert (state["train_state"]["epoch"], state["train_state"]["batches_done"]) == (1, 2)
    assert open(out / "checkpoints" / "latest").read().strip() == "step-00000007"
    launch("train_finetune.py", ["--data-dir", data, *ARGS, "--output-dir", out,
                                 "--resume-from-checkpoint", "latest"], offline_env)
    assert_ends_as_uninterrupted(out, full)


TWICE = """
import json, os, signal, sys
from train_finetune import main
data, out = sys.argv[1], sys.argv[2]
args = ["--data-dir", data, "--model", "timm:test_resnet", "--no-pretrained", "--batch-size",
        "4", "--num-workers", "0", "--epochs", "2", "--checkpointing-steps", "2",
        "--checkpoints-total-limit", "0", "--report-to", "none", "--output-dir", out]
mine = lambda signum, frame: None
signal.signal(signal.SIGTERM, mine)
found = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN under a shell's `&`
first = main(args)
print("after 1:", signal.getsignal(signal.SIGTERM) is mine,
      signal.getsignal(signal.SIGINT) is found)
for d in sorted(os.listdir(os.path.join(out, "checkpoints"))):
    os.utime(os.path.join(out, "checkpoints", d), (0, 0))  # mark the first run's folders
second = main(args + ["--overwrite-output-dir", "--seed", "5"])
root = os.path.join(out, "checkpoints")
fresh = [d for d in sorted(os.listdir(root)) if d.startswith("step-")
         and os.stat(os.path.join(root, d)).st_mtime > 0]
print("second run's checkpoints:", ",".join(fresh))
print("latest:", open(os.path.join(root, "latest")).read().strip())
"""


def test_main_twice_in_one_process_saves_every_checkpoint_and_restores_signal_handlers(
        data, tmp_path, offline_env):
    """A notebook calls main() again on the same folder: the second run writes its own
    checkpoints (a module-level 'already saved' set once skipped them), and each run hands
    back the SIGTERM/SIGINT handlers it found."""
    proc = subprocess.run([sys.executable, "-c", TWICE, data, str(tmp_path / "run")],
                          cwd=REPO, env=dict(offline_env, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after 1: True True" in proc.stdout, proc.stdout
    # 18 images / batch 4 = 5 steps per epoch: a checkpoint every 2 of its 10 steps
    assert ("second run's checkpoints: step-00000002,step-00000004,step-00000006,"
            "step-00000008,step-00000010") in proc.stdout, proc.stdout
    assert "latest: step-00000010" in proc.stdout


def test_checkpoints_keep_scalars_in_the_train_state_and_predictions_in_best(
        uninterrupted, tmp_path):
    """Per-image predictions (logits of every val image) once rode in every checkpoint's
    train_state.json, as Python lists on every process: ~1 GB at 50k images x 1000 classes.
    They are one file under best/ now, written and read by the main process only."""
    from safetensors.torch import load_file

    full, out = uninterrupted
    doc = json.load(open(out / "checkpoints" / "step-00000030" / "train_state.json"))
    best = doc["train_state"]["best"]
    assert all(isinstance(v, (int, float, str)) for v in best.values()), best
    preds = load_file(str(out / "best" / "predictions.safetensors"))
    assert preds["logits"].shape == (full["val_samples"], len(full["class_names"]))
    assert sorted(preds["index"].tolist()) == list(range(full["val_samples"]))
    assert (preds["pred"] == preds["label"]).double().mean().item() == \
        full["best_val_accuracy"]
    assert (out / "checkpoints" / "step-00000030" / "best" / "predictions.safetensors").exists()
    # the processes other than the main one check best/ but do not hold it
    ckpt = read_checkpoint(str(out / "checkpoints" / "step-00000030"), keep_best=False)
    assert ckpt.best == {} and dataclasses.asdict(ckpt.state.best) == best
    tampered = tmp_path / "t"
    shutil.copytree(out / "checkpoints" / "step-00000030", tampered)
    with open(tampered / "best" / "predictions.safetensors", "r+b") as fh:
        fh.truncate(64)
    with pytest.raises(UserError, match="predictions.safetensors changed"):
        read_checkpoint(str(tampered), keep_best=False)


def test_a_checkpoint_with_predictions_in_its_train_state_resumes_with_them_in_best(
        uninterrupted, tmp_path):
    """Checkpoints written before best/predictions.safetensors carried the predictions per
    image in train_state.json: read, they become best/'s file again, and the train state
    keeps its typed scalars."""
    from safetensors.torch import load_file

    from common.checkpoint import _write_manifest, restore_best

    full, out = uninterrupted
    ckpt = tmp_path / "step-00000030"
    shutil.copytree(out / "checkpoints" / "step-00000030", ckpt)
    preds = load_file(str(ckpt / "best" / "predictions.safetensors"))
    os.remove(ckpt / "best" / "predictions.safetensors")
    doc = json.load(open(ckpt / "train_state.json"))
    doc["train_state"]["best"]["predictions"] = {k: v.tolist() for k, v in preds.items()}
    with open(ckpt / "train_state.json", "w") as fh:
        json.dump(doc, fh)
    os.remove(ckpt / "manifest.json")
    _write_manifest(str(ckpt))  # as the older version wrote it
    loaded = read_checkpoint(str(ckpt))
    assert loaded.state.best.val_accuracy == full["best_val_accuracy"]
    run = tmp_path / "run"
    run.mkdir()
    restore_best(str(run), loaded)
    back = load_file(str(run / "best" / "predictions.safetensors"))
    assert set(back) == set(preds)
    assert all(torch.equal(back[k], preds[k]) for k in preds)
