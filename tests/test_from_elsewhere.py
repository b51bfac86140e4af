"""A run folder, export or checkpoint someone else made (or a data folder with odd entries)
can be refused, never obeyed: nothing is written through a link, nothing blocks on a FIFO or
reads without end, nothing in model.json downloads or allocates without bound."""

import json
import os
import shutil

import pytest

from conftest import launch, make_image_folder, run_script
from test_bad_input import TINY, assert_one_line_error


@pytest.fixture(scope="module")
def run(tmp_path_factory, offline_env):
    root = tmp_path_factory.mktemp("elsewhere")
    data = make_image_folder(root / "data")
    out = root / "run"
    launch("train_extractor.py", ["--data-dir", data, *TINY, "--epochs", "2",
                                  "--checkpointing-steps", "epoch", "--output-dir", out],
           offline_env)
    return data, out


def _copy(run, tmp_path):
    data, out = run
    mine = tmp_path / "run"
    shutil.copytree(out, mine, symlinks=True)
    return data, mine


@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_export_never_writes_through_a_link_in_the_run_folder(run, tmp_path, offline_env,
                                                              fmt, name):
    data, mine = _copy(run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, mine / "best" / name)
    proc = run_script("export.py", [mine, "--format", fmt], offline_env)
    assert_one_line_error(proc, "is a symbolic link", "refusing to write through it")
    assert victim.read_text() == "keep me"
    os.unlink(mine / "best" / name)  # the link gone: written, as a new file
    proc = run_script("export.py", [mine, "--format", fmt], offline_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (mine / "best" / name).is_file() and not (mine / "best" / name).is_symlink()
    assert not [f for f in os.listdir(mine / "best") if f.startswith(".tmp-")]


def test_export_refuses_a_best_folder_that_is_a_link(run, tmp_path, offline_env):
    data, mine = _copy(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(mine / "best", elsewhere)
    os.symlink(elsewhere, mine / "best")
    proc = run_script("export.py", [mine, "--format", "onnx"], offline_env)
    assert_one_line_error(proc, "is a symbolic link")
    assert not (elsewhere / "model.onnx").exists()


def _in_time(function, *args, seconds=20):
    """function(*args)'s result or exception, failing the test if it has not returned in
    `seconds` (a FIFO opened for reading blocks until a writer comes)."""
    import threading

    out = {}

    def call():
        try:
            out["value"] = function(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{function.__name__} still blocked after {seconds} s"
    return out


def _checkpoints(mine):
    return sorted((mine / "checkpoints").glob("step-*"))


def test_a_manifest_that_is_a_fifo_a_device_or_too_deep_is_refused_at_once(run, tmp_path):
    from common.checkpoint import read_checkpoint
    from common.errors import UserError

    _, mine = _copy(run, tmp_path)
    ckpt = _checkpoints(mine)[-1]
    os.remove(ckpt / "manifest.json")
    os.mkfifo(ckpt / "manifest.json")
    out = _in_time(read_checkpoint, str(ckpt))
    assert isinstance(out.get("error"), UserError), out
    assert "not a checkpoint written by these scripts" in str(out["error"])
    os.remove(ckpt / "manifest.json")
    os.symlink("/dev/zero", ckpt / "manifest.json")
    out = _in_time(read_checkpoint, str(ckpt))
    assert "not a checkpoint written by these scripts" in str(out.get("error")), out
    os.remove(ckpt / "manifest.json")
    (ckpt / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    out = _in_time(read_checkpoint, str(ckpt))
    assert "not a checkpoint written by these scripts" in str(out.get("error")), out


def test_a_checkpoint_file_that_is_a_fifo_or_larger_than_declared_is_refused_unread(
        run, tmp_path):
    from common.checkpoint import read_checkpoint

    _, mine = _copy(run, tmp_path)
    ckpt = _checkpoints(mine)[-1]
    os.remove(ckpt / "optimizer.pt")
    os.mkfifo(ckpt / "optimizer.pt")
    out = _in_time(read_checkpoint, str(ckpt))
    assert "optimizer.pt is a link or not a regular file" in str(out.get("error")), out
    _, mine = _copy(run, tmp_path / "b")
    ckpt = _checkpoints(mine)[-1]
    with open(ckpt / "model.safetensors", "ab") as fh:  # grown past its declared size
        fh.write(b"\0" * 4096)
    out = _in_time(read_checkpoint, str(ckpt))
    assert "model.safetensors changed since it was written" in str(out.get("error")), out


def test_a_train_state_of_another_shape_is_one_line_and_latest_falls_back_past_it(
        run, tmp_path, offline_env):
    import hashlib

    data, mine = _copy(run, tmp_path)
    newest = _checkpoints(mine)[-1]
    doc = json.load(open(newest / "train_state.json"))
    doc["train_state"]["best"] = [1, 2]  # a list where a mapping belongs
    raw = json.dumps(doc).encode()
    (newest / "train_state.json").write_bytes(raw)
    manifest = json.load(open(newest / "manifest.json"))  # made to match, as anyone can
    manifest["files"]["train_state.json"] = hashlib.sha256(raw).hexdigest()
    manifest["sizes"]["train_state.json"] = len(raw)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    bad = tmp_path / "bad"
    shutil.copytree(newest, bad)
    proc = launch("train_extractor.py", ["--data-dir", data, *TINY, "--epochs", "2",
                                         "--checkpointing-steps", "epoch", "--output-dir",
                                         mine, "--resume-from-checkpoint", "latest"],
                  offline_env)
    assert (f"{newest.name} is damaged (train_state.json holds a train state of another "
            "shape (AttributeError)); resuming from the checkpoint before it") in proc.stdout
    proc = run_script("train_extractor.py", ["--data-dir", data, *TINY, "--epochs", "2",
                                             "--output-dir", tmp_path / "x",
                                             "--resume-from-checkpoint", bad], offline_env)
    assert_one_line_error(proc, "train_state.json holds a train state of another shape",
                          status=1)


def _edit_meta(best, **changes):
    meta = json.load(open(best / "model.json"))
    meta.update(changes)
    (best / "model.json").write_text(json.dumps(meta))
    return meta


@pytest.mark.parametrize("field, value, message", [
    ("preprocessing", {"input_size": 160, "resize": 100000, "mean": [0.5] * 3,
                       "std": [0.5] * 3, "interpolation": "bilinear"},
     "preprocessing 'resize' is 100000"),
    ("model", "evil:thing", "'model' is 'evil:thing'"),
    ("class_names", "cat", "'class_names' is not a list"),
    ("temperature", -1, "'temperature' is not a positive number"),
])
def test_predict_refuses_a_model_json_it_did_not_write(run, tmp_path, offline_env, field,
                                                       value, message):
    data, mine = _copy(run, tmp_path)
    _edit_meta(mine / "best", **{field: value})
    proc = run_script("predict.py", [mine, os.path.join(data, "val")], offline_env)
    assert_one_line_error(proc, "model.json", message, "refusing it")


def test_a_model_json_that_is_a_fifo_is_refused_at_once(run, tmp_path, offline_env):
    from common.errors import UserError
    from common.export import load_exported

    _, mine = _copy(run, tmp_path)
    os.remove(mine / "best" / "model.json")
    os.mkfifo(mine / "best" / "model.json")
    out = _in_time(load_exported, str(mine / "best"))
    assert isinstance(out.get("error"), UserError), out
    assert "a link, not a regular file" in str(out["error"])


def test_a_hub_models_export_loads_offline_from_its_own_config(run, tmp_path, offline_env):
    """model.json naming hf-hub:ORG/NAME: rebuilt from the folder's config.json (timm's
    architecture), never by fetching the Hub's config (which loading by name does even
    without weights)."""
    data, mine = _copy(run, tmp_path)
    _edit_meta(mine / "best", model="hf-hub:someone/not-on-this-machine")
    out = tmp_path / "p.csv"
    proc = run_script("predict.py", [mine, os.path.join(data, "val"), "--output", out],
                      offline_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(open(out).read().splitlines()) == 10


def test_links_back_up_the_tree_and_a_fifo_among_the_images_are_listed_once_or_skipped(
        tmp_path, offline_env):
    from common.data import image_files

    data = make_image_folder(tmp_path / "data")
    cat = tmp_path / "data" / "train" / "cat"
    os.symlink(".", cat / "again")          # the same folder under another name
    os.symlink("..", cat / "up")            # two links up: os.walk(followlinks) never ended
    os.symlink("..", cat / "up2")
    os.mkfifo(cat / "x.jpg")                # reading it would block the image check
    out = _in_time(image_files, str(cat))
    assert sorted(map(os.path.basename, out["value"])) == [f"{i}.jpg" for i in range(6)]
    run_dir = tmp_path / "run"
    proc = run_script("train_extractor.py", ["--data-dir", data, *TINY, "--epochs", "1",
                                             "--output-dir", run_dir], offline_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x.jpg: not a regular file" in proc.stdout + proc.stderr
    res = json.load(open(run_dir / "results.json"))
    assert (res["train_samples"], res["val_samples"]) == (18, 9)


def _wandb_config(run_dir):
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "wandb")
    proc = subprocess.run([exe, "leet", "inspect", "--summary", "--json", run_dir],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["config"]


def test_a_checkpoint_resumed_in_another_folder_starts_its_own_wandb_run(
        tmp_path, offline_env):
    """Its own folder continues its W&B run; another --output-dir (a fork, a colleague's
    checkpoint) is a new run that records the one it came from, never writes into it."""
    import glob

    data = make_image_folder(tmp_path / "data")
    args = ["--data-dir", data, *TINY[:-2], "--epochs", "2", "--checkpointing-steps", "epoch",
            "--checkpoints-total-limit", "0"]
    first = tmp_path / "first"
    launch("train_extractor.py", [*args, "--output-dir", first], offline_env)
    [run] = glob.glob(str(first / "wandb" / "offline-run-*"))
    first_id = run.rsplit("-", 1)[1]
    ckpt = sorted((first / "checkpoints").glob("step-*"))[0]
    fork = tmp_path / "fork"
    launch("train_extractor.py", [*args, "--output-dir", fork, "--resume-from-checkpoint",
                                  ckpt], offline_env)
    [forked] = glob.glob(str(fork / "wandb" / "offline-run-*"))
    assert forked.rsplit("-", 1)[1] != first_id
    assert _wandb_config(forked)["forked_from_run_id"] == first_id
    assert len(glob.glob(str(first / "wandb" / "offline-run-*"))) == 1  # not written into
    launch("train_extractor.py", [*args, "--output-dir", first, "--resume-from-checkpoint",
                                  ckpt], offline_env)
    runs = glob.glob(str(first / "wandb" / "offline-run-*"))
    assert {r.rsplit("-", 1)[1] for r in runs} == {first_id}
