"""Numbers a run reports are its model's, and a resume cannot silently change what they
mean: checkpoints resume only on the classes and lr they were trained with; one class is
refused; a class absent from val is left out of the averages, and said."""

import json
import os
import shutil

import pytest

from conftest import launch, make_image_folder, run_script
from test_bad_input import TINY, assert_one_line_error
EXTRACT = [*TINY, "--epochs", "3", "--checkpointing-steps", "epoch",
           "--checkpoints-total-limit", "0", "--extract-precision", "fp32", "--seed", "3"]


@pytest.fixture(scope="module")
def extractor_run(tmp_path_factory, offline_env):
    """An extractor run at a fixed --lr 0.05, checkpointed at every epoch."""
    root = tmp_path_factory.mktemp("trust")
    data = make_image_folder(root / "data")
    out = root / "run"
    launch("train_extractor.py", ["--data-dir", data, *EXTRACT, "--lr", "0.05",
                                  "--output-dir", out], offline_env)
    return data, out, json.load(open(out / "results.json"))


def _epoch_1(out):
    return sorted((out / "checkpoints").glob("step-*"))[0]


def test_resume_on_classes_renamed_or_reordered_is_refused_in_one_line(
        extractor_run, tmp_path, offline_env):
    data, out, _ = extractor_run
    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    for split in ("train", "val"):  # the same count of classes, another order of names
        os.rename(moved / split / "cat", moved / split / "zebra")
    proc = run_script("train_extractor.py", [
        "--data-dir", moved, *EXTRACT, "--lr", "0.05", "--output-dir", tmp_path / "r",
        "--resume-from-checkpoint", _epoch_1(out)], offline_env)
    assert_one_line_error(proc, "trained on the classes [cat, dog, fox]",
                          "this data has [dog, fox, zebra]")


def test_resume_on_changed_images_says_so_and_goes_on(extractor_run, tmp_path, offline_env):
    data, out, _ = extractor_run
    changed = tmp_path / "data"
    shutil.copytree(data, changed)
    shutil.copy(changed / "train" / "cat" / "0.jpg", changed / "train" / "cat" / "extra.jpg")
    proc = launch("train_extractor.py", [
        "--data-dir", changed, *EXTRACT, "--lr", "0.05", "--output-dir", tmp_path / "r",
        "--resume-from-checkpoint", _epoch_1(out)], offline_env)
    assert "the images are not those it was trained on" in proc.stdout + proc.stderr


def test_resume_with_lr_auto_trains_at_the_checkpoints_lr_and_a_changed_lr_is_refused(
        extractor_run, tmp_path, offline_env):
    data, out, full = extractor_run
    resumed = tmp_path / "r"
    launch("train_extractor.py", ["--data-dir", data, *EXTRACT, "--lr", "auto",
                                  "--output-dir", resumed,
                                  "--resume-from-checkpoint", _epoch_1(out)], offline_env)
    res = json.load(open(resumed / "results.json"))
    assert res["lr"] == 0.05
    for key in ("final_val_accuracy", "best_val_accuracy", "best_epoch"):
        assert res[key] == full[key], key
    assert res["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-5)
    proc = run_script("train_extractor.py", [
        "--data-dir", data, *EXTRACT, "--lr", "0.1", "--output-dir", tmp_path / "r2",
        "--resume-from-checkpoint", _epoch_1(out)], offline_env)
    assert_one_line_error(proc, "peak lr 0.05 and --lr is 0.1", "--lr auto")


def test_a_single_class_is_refused_before_any_work(tmp_path, offline_env):
    data = make_image_folder(tmp_path / "data", classes=("cat",))
    proc = run_script("train_finetune.py", ["--data-dir", data, *EXTRACT,
                                            "--output-dir", tmp_path / "r"], offline_env)
    assert_one_line_error(proc, f"--data-dir {data}: 1 class (cat)", "at least 2")


def test_a_class_without_val_images_is_left_out_of_the_averages_and_named(
        tmp_path, offline_env):
    data = make_image_folder(tmp_path / "data")
    shutil.rmtree(os.path.join(data, "val", "fox"))
    os.makedirs(os.path.join(data, "val", "fox"))  # the folder stays: same classes
    out = tmp_path / "r"
    proc = launch("train_extractor.py", ["--data-dir", data, *EXTRACT, "--output-dir", out],
                  offline_env)
    res = json.load(open(out / "results.json"))
    assert res["classes_without_val_images"] == ["fox"]
    assert "no val image of 1 class(es) (fox)" in proc.stdout + proc.stderr
    per_class = res["best_val_per_class"]
    assert per_class["fox"]["val_images"] == 0
    recalls = [per_class[c]["recall"] for c in ("cat", "dog")]
    assert res["best_val_balanced_accuracy"] == pytest.approx(sum(recalls) / 2)
    f1s = [per_class[c]["f1"] for c in ("cat", "dog")]
    assert res["best_val_macro_f1"] == pytest.approx(sum(f1s) / 2)


@pytest.mark.parametrize("script, flags", [("train_extractor.py", []),
                                           ("train_finetune.py", ["--probe-epochs", "0"])])
def test_a_time_box_resumed_at_its_end_evaluates_and_ends_with_its_results(
        tmp_path, offline_env, script, flags):
    """--max-train-steps 3 stops inside epoch 1 and checkpoints before its evaluation, so
    the checkpoint holds no best model yet: resumed with the same box (twice), the run
    evaluates where it stands and ends with the first session's results."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--data-dir", data, *TINY, "--epochs", "3", *flags, "--max-train-steps", "3",
            "--output-dir", out]
    launch(script, args, offline_env)
    first = json.load(open(out / "results.json"))
    first_rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert first["optimizer_steps"] == 3 and first_rows[-1]["partial"]
    for _ in range(2):
        launch(script, [*args, "--resume-from-checkpoint", "latest"], offline_env)
        again = json.load(open(out / "results.json"))
        for key in ("best_val_accuracy", "best_epoch", "optimizer_steps",
                    "best_confusion_matrix"):
            assert again[key] == first[key], key
        assert again["best_val_loss"] == pytest.approx(first["best_val_loss"], rel=1e-6)
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
        assert [(r["epoch"], r.get("partial")) for r in rows] == \
            [(r["epoch"], r.get("partial")) for r in first_rows]
        assert rows[-1]["train_loss"] == pytest.approx(first_rows[-1]["train_loss"])
        assert os.path.isfile(out / "best" / "model.safetensors")


def test_what_killed_runs_left_is_removed_at_start_and_a_live_writers_file_is_not(
        tmp_path, offline_env):
    """A killed export (.export-*), a folder set aside (.old-*), half-written files (.tmp-*)
    in the run folder, best/ and checkpoints/, and a killed extraction's temporary cache file
    are removed when the run resumes; a cache file another job is writing (touched just
    now) and the user's own files stay."""
    import time

    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["--data-dir", data, *TINY, "--epochs", "2", "--checkpointing-steps", "epoch",
            "--output-dir", out]
    env = dict(offline_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    launch("train_extractor.py", args, env)
    cache = tmp_path / "cache" / "transfer-learning" / "features"
    old = time.time() - 3600
    planted = [out / ".export-abc", out / ".old-xyz", out / "best" / ".tmp-1",
               out / "checkpoints" / ".tmp-step-00000003",
               os.path.join(cache, ".tmp-killed.safetensors")]
    for path in planted:
        if str(path).endswith(("abc", "xyz", "00003")):
            os.makedirs(path)
        else:
            open(path, "w").write("x")
        os.utime(path, (old, old))
    live = os.path.join(cache, ".tmp-live.safetensors")
    open(live, "w").write("x")
    (out / "notes.txt").write_text("mine")
    for f in os.listdir(cache):  # the features extracted again, so the cache is written
        if f.endswith(".safetensors") and not f.startswith("."):
            os.remove(os.path.join(cache, f))
    proc = launch("train_extractor.py", [*args, "--resume-from-checkpoint", "latest"], env)
    assert "removed what an interrupted run left in" in proc.stdout
    assert [p for p in planted if os.path.exists(p)] == []
    assert os.path.exists(live) and (out / "notes.txt").read_text() == "mine"


def test_an_image_check_cache_cut_short_is_ignored_with_a_warning_and_written_again(
        tmp_path, offline_env):
    data = make_image_folder(tmp_path / "data")
    env = dict(offline_env, XDG_CACHE_HOME=str(tmp_path / "cache"))
    args = ["--data-dir", data, *TINY, "--epochs", "1"]
    launch("train_extractor.py", [*args, "--output-dir", tmp_path / "a"], env)
    checks = tmp_path / "cache" / "transfer-learning" / "image-checks"
    files = sorted(checks.glob("*.json"))
    assert len(files) == 2  # train and val
    files[0].write_text("")  # what a power loss before the data reached the disk leaves
    proc = launch("train_extractor.py", [*args, "--output-dir", tmp_path / "b"], env)
    assert "an image-check cache that does not parse" in proc.stdout + proc.stderr
    assert json.loads(files[0].read_text())["format"] == 1


@pytest.mark.parametrize("var", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_launch_config_is_refused_in_one_line_naming_the_configs_that_work(
        tmp_path, offline_env, var):
    data = make_image_folder(tmp_path / "data", counts={"train": 2, "val": 1})
    proc = run_script("train_finetune.py", ["--data-dir", data, *TINY, "--output-dir",
                                            tmp_path / "r"], dict(offline_env, **{var: "true"}))
    assert_one_line_error(proc, var, "multi_gpu.yaml")
    assert not (tmp_path / "r").exists()
