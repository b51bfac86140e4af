"""Both entry scripts, launched as users launch them, on a tiny generated image folder."""

import csv
import glob
import json
import os
import subprocess

import pandas
import pytest
import torch
from safetensors.torch import load_file

from conftest import launch, make_image_folder, run_script

TINY = ["--model", "test_resnet", "--batch-size", "4", "--num-workers", "0"]  # timm's
RESULT_KEYS = {"best_val_accuracy", "best_epoch", "epochs", "train_samples", "val_samples",
               "num_processes", "mixed_precision", "wall_seconds"}


def read_results(out):
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("script", ["train_finetune.py", "train_extractor.py"])
@pytest.mark.parametrize("nproc", [1, 2])
def test_script_trains_and_writes_a_complete_run_folder(script, nproc, image_folder,
                                                        tiny_weights, tmp_path, offline_env):
    out = tmp_path / "run"
    # rates at which the colour-coded tiny set is learned in 3 epochs
    lr = (["--optimizer", "sgd", "--lr", "0.1", "--freeze-epochs", "0", "--probe-epochs", "0"]
          if "finetune" in script else ["--lr", "0.5"])
    proc = launch(script, ["--data-dir", image_folder, *TINY, "--weights", tiny_weights,
                           "--epochs", "3", *lr, "--output-dir", out, "--report-to", "none"],
                  offline_env, nproc=nproc)
    res = read_results(out)
    assert RESULT_KEYS <= res.keys()
    assert res["num_processes"] == nproc
    assert res["train_samples"] == 18 and res["val_samples"] == 9
    assert res["epochs"] == 3 and res["best_epoch"] in (1, 2, 3)
    assert res["mixed_precision"] == "no"
    assert res["best_val_accuracy"] >= 6 / 9, res  # twice chance (3 of 9)
    low, high = res["best_val_accuracy_ci95"]  # Wilson interval on 9 images
    assert low < res["best_val_accuracy"] <= high and high - low > 0.25
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["val_samples"] == 9 and r["train_samples"] == 18 for r in rows)
    assert max(r["val_accuracy"] for r in rows) == res["best_val_accuracy"]
    # the same rows flat, as pandas reads them; which part of the model trained in each
    table = pandas.read_csv(out / "summary.csv", float_precision="round_trip")
    assert list(table["epoch"]) == [1, 2, 3]
    assert list(table["val_accuracy"]) == [r["val_accuracy"] for r in rows]
    assert set(table["stage"]) == {"head" if "extractor" in script else "all-layers"}
    assert res["best_stage"] == table["stage"][0]
    meta = json.load(open(out / "best" / "model.json"))
    assert meta["class_names"] == ["cat", "dog", "fox"]
    # test_resnet's pretrained config is 160 px; the fine-tune trains 40-px images at 128
    assert meta["preprocessing"]["input_size"] == res["image_size"] == \
        (160 if "extractor" in script else 128)
    assert (out / "config.yaml").exists() and (out / "best" / "model.safetensors").exists()
    # the tutorial's per-epoch lines, with speed and time left, said once (by the main
    # process) however many processes run; the same lines with times in the run's train.log
    epoch_lines = [line for line in proc.stdout.splitlines() if line.startswith("Epoch ")]
    assert [line.split(",")[0] for line in epoch_lines] == ["Epoch 1/3", "Epoch 2/3",
                                                            "Epoch 3/3"], proc.stdout
    assert all(" left" in line for line in epoch_lines[:2])
    train_lines = [line for line in proc.stdout.splitlines() if line.startswith("train Loss:")]
    assert len(train_lines) == 3 and all(line.endswith(" img/s") for line in train_lines)
    assert "val Loss:" in proc.stdout and "[RANK" not in proc.stdout
    log = (out / "train.log").read_text()
    assert log.count("Epoch 1/3") == 1 and "Best val Acc" in log
    assert log.splitlines()[0][:4].isdigit()  # each line starts with its date and time


@pytest.mark.launch
@pytest.mark.parametrize("nproc", [1, 2])
def test_the_fast_tier_computes_what_accelerate_launch_computes(nproc, image_folder,
                                                                tiny_weights, tmp_path,
                                                                offline_env):
    """The README's test command runs the scripts in process (1) or forked from it (2); a
    real `accelerate launch` with the same config gives the same metrics, row for row."""
    args = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights, "--epochs", "2",
            "--probe-epochs", "2", "--report-to", "none"]

    def rows(out):
        return [{k: v for k, v in json.loads(line).items() if "seconds" not in k}
                for line in open(out / "metrics.jsonl")]

    launch("train_finetune.py", [*args, "--output-dir", tmp_path / "real"], offline_env,
           nproc=nproc, real=True)
    launch("train_finetune.py", [*args, "--output-dir", tmp_path / "fast"], offline_env,
           nproc=nproc)
    assert len(rows(tmp_path / "real")) == 3  # the probe's epoch 0, then 2
    assert rows(tmp_path / "real") == rows(tmp_path / "fast")


def _backbone_tensors(state, head="fc."):
    return {k: v for k, v in state.items() if not k.startswith(head)}


@pytest.mark.parametrize("mode", [["--cache-features"], ["--no-cache-features"],
                                  ["--no-cache-features", "--feature-views", "1"]])
def test_extractor_leaves_backbone_and_batchnorm_bit_identical(image_folder, tiny_weights,
                                                               tmp_path, offline_env, mode):
    out = tmp_path / "run"
    launch("train_extractor.py", ["--data-dir", image_folder, *TINY, "--weights", tiny_weights,
                                  "--epochs", "2", "--lr", "0.5", "--output-dir", out,
                                  "--report-to", "none", "--feature-cache-dir",
                                  tmp_path / "cache", *mode], offline_env)
    start, end = load_file(tiny_weights), load_file(str(out / "best" / "model.safetensors"))
    backbone = _backbone_tensors(end)
    assert any(k.endswith("running_var") for k in backbone)
    assert set(backbone) == set(_backbone_tensors(start))
    for k, v in backbone.items():
        assert torch.equal(v, start[k]), f"{k} changed"
    assert end["fc.weight"].shape == (3, start["fc.weight"].shape[1])


@pytest.mark.parametrize("bn", ["default", "--bn-eval"])
def test_finetune_trains_the_backbone(image_folder, tiny_weights, tmp_path, offline_env, bn):
    out = tmp_path / "run"
    launch("train_finetune.py", ["--data-dir", image_folder, *TINY, "--weights", tiny_weights,
                                 "--epochs", "1", "--freeze-epochs", "0", "--probe-epochs", "0",
                                 "--output-dir", out, "--report-to", "none",
                                 *([bn] if bn != "default" else [])], offline_env)
    start, end = load_file(tiny_weights), load_file(str(out / "best" / "model.safetensors"))
    changed = [k for k, v in _backbone_tensors(end).items() if not torch.equal(v, start[k])]
    assert any(k.endswith("weight") for k in changed)
    stats = [k for k in _backbone_tensors(end) if k.endswith(("running_mean", "running_var"))]
    assert stats
    if bn == "--bn-eval":  # BatchNorm statistics stay as pretrained, bit for bit
        assert not set(stats) & set(changed)
    else:  # by default, statistics follow the training batches
        assert any(k.endswith("running_mean") for k in changed)


def _inspect(run_dir):
    exe = os.path.join(os.path.dirname(os.sys.executable), "wandb")
    proc = subprocess.run([exe, "leet", "inspect", "--summary", "--json", run_dir],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_wandb_offline_two_processes_make_one_run_with_config_and_summary(
        image_folder, tmp_path, offline_env):
    out = tmp_path / "run"
    env = dict(offline_env)
    del env["WANDB_MODE"]  # no account, no mode: the script must choose offline itself
    env["NETRC"] = str(tmp_path / "no-netrc")
    proc = launch("train_extractor.py", ["--data-dir", image_folder, *TINY, "--no-pretrained",
                                         "--epochs", "2", "--output-dir", out,
                                         "--run-name", "tiny-run", "--tags", "tiny,ci"],
                  env, nproc=2)
    assert "logging offline" in proc.stdout
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 1, runs
    info = _inspect(runs[0])
    res = read_results(out)
    assert info["name"] == "tiny-run"
    assert info["config"]["num_processes"] == 2 and info["config"]["model"] == "test_resnet"
    assert info["config"]["batch_size"] == 4 and info["config"]["global_batch_size"] == 8
    assert info["summary"]["best_val_accuracy"] == pytest.approx(res["best_val_accuracy"])
    assert info["summary"]["best_epoch"] == res["best_epoch"]
    assert info["summary"]["val/samples"] == 9
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert info["summary"]["train/loss"] == pytest.approx(last["train_loss"])  # epoch end
    assert info["summary"]["train/lr"] == pytest.approx(last["lr"])
    assert info["summary"]["val/f1/cat"] == pytest.approx(last["val_per_class"]["cat"]["f1"])
    assert sorted(info["tags"]) == ["ci", "tiny"]
    assert info["config"]["torch_version"] and "git_commit" in info["config"]
    # 18 images / (4 x 2 processes) = 3 optimiser steps per epoch, 2 epochs: W&B charts
    # against our step (its own _step counts log calls)
    assert info["summary"]["train/step"] == 6
    header = _run_record(runs[0])
    assert header["job_type"] == "extractor" and header["run_group"] == "data/test_resnet"


def _run_record(run_dir):
    """The run record of an offline W&B run (group, job type), via wandb's own reader."""
    exe = os.path.join(os.path.dirname(os.sys.executable), "wandb")
    out = subprocess.run([exe, "leet", "inspect", "--json", run_dir], capture_output=True,
                         text=True, timeout=120).stdout
    return next(json.loads(line)["run"] for line in out.splitlines()
                if line.startswith("{") and json.loads(line).get("type") == "run")


@pytest.mark.parametrize("flags", [["--quiet"], ["--log-level", "warning"]])
def test_quiet_and_log_level_thin_the_console(flags, tmp_path, offline_env):
    """--quiet: warnings and the final line on the console, every line still in train.log;
    --log-level warning: no info lines in either."""
    data = make_image_folder(tmp_path / "data")
    open(os.path.join(data, "train", "cat", "broken.jpg"), "wb").write(b"not a jpeg")
    out = tmp_path / "run"
    proc = launch("train_extractor.py", ["--data-dir", data, *TINY, "--no-pretrained",
                                         "--epochs", "2", "--output-dir", out,
                                         "--report-to", "none", *flags], offline_env)
    console = proc.stdout.splitlines()
    assert any(line.startswith("warning: skipping unreadable image") for line in console)
    assert not any(line.startswith(("Epoch", "train Loss", "val Loss", "extractor:"))
                   for line in console), proc.stdout
    assert any(line.startswith("Best val Acc") for line in console) == (flags == ["--quiet"])
    assert "epoch 1 train" not in proc.stderr  # no progress bar either
    log = (out / "train.log").read_text()
    quiet = flags == ["--quiet"]
    assert "warning: skipping unreadable image" in log
    assert ("Epoch 2/2" in log) == quiet and ("Best val Acc" in log) == quiet


def test_python_entry_points_return_the_results_and_raise_user_errors(
        image_folder, tiny_weights, tmp_path, offline_env, monkeypatch):
    """README: `finetune(...)` / `extract(...)` from a notebook: options as keyword arguments
    (and/or a command line), the results returned, a bad option or input an exception
    (UserError), not an exit of the notebook's kernel."""
    import logging

    from common.errors import UserError
    from conftest import _fresh_process_state
    from train_extractor import extract
    from train_finetune import finetune

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        monkeypatch.setenv(key, offline_env[key])
    monkeypatch.chdir(tmp_path)
    _fresh_process_state()
    try:
        common = dict(data_dir=image_folder, model="test_resnet", weights=tiny_weights,
                      batch_size=4, num_workers=0, report_to="none")
        res = finetune(epochs=1, output_dir=str(tmp_path / "ft"), **common)
        assert res["best_val_accuracy"] == read_results(tmp_path / "ft")["best_val_accuracy"]
        assert (res["script"], res["epochs"]) == ("finetune", 1)
        assert res["output_dir"] == str(tmp_path / "ft")
        assert not [h for h in logging.getLogger("transfer_learning").handlers
                    if isinstance(h, logging.FileHandler)]  # train.log closed
        _fresh_process_state()
        res = extract(["--epochs", "2"], epochs=1, output_dir=str(tmp_path / "ex"), **common)
        assert (res["script"], res["epochs"]) == ("extractor", 2)  # the command line wins
        _fresh_process_state()
        with pytest.raises(UserError, match=r"finetune\(\): unknown option 'epoch'; did you "
                                            "mean 'epochs'"):
            finetune(epoch=3, **common)
        with pytest.raises(UserError, match="'optimizer' should be one of"):
            finetune(optimizer="adam", **common)
        with pytest.raises(UserError, match="--data-dir"):
            extract(**dict(common, data_dir=str(tmp_path / "nowhere")))
    finally:
        _fresh_process_state()


def test_tensorboard_tracker_writes_event_files(image_folder, tmp_path, offline_env):
    out = tmp_path / "run"
    launch("train_extractor.py", ["--data-dir", image_folder, *TINY, "--no-pretrained",
                                  "--epochs", "1", "--output-dir", out,
                                  "--report-to", "tensorboard"], offline_env)
    assert glob.glob(str(out / "**" / "events.out.tfevents.*"), recursive=True)


def test_epochs_0_gives_identical_metrics_on_1_and_2_processes(tmp_path, offline_env):
    # 3 classes x 5 = 15 val images: odd, and not a multiple of batch x processes
    root = make_image_folder(tmp_path / "d", counts={"train": 2, "val": 5})
    results = []
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        launch("train_finetune.py", ["--data-dir", root, *TINY, "--no-pretrained", "--epochs",
                                     "0", "--output-dir", out, "--report-to", "none"],
               offline_env, nproc=nproc)
        results.append(read_results(out))
    one, two = results
    assert one["val_samples"] == two["val_samples"] == 15
    assert one["best_val_accuracy"] == two["best_val_accuracy"]
    assert one["best_val_loss"] == pytest.approx(two["best_val_loss"], rel=1e-5)
    assert one["best_confusion_matrix"] == two["best_confusion_matrix"]
    assert one["best_epoch"] == 0 and one["epochs"] == 0


def test_exported_model_loads_alone_and_reproduces_val_accuracy(image_folder, tmp_path,
                                                                 offline_env):
    from common.export import load_exported
    from common.data import build_transforms, load_image_folder

    out = tmp_path / "run"
    launch("train_finetune.py", ["--data-dir", image_folder, *TINY, "--no-pretrained",
                                 "--epochs", "2", "--output-dir", out, "--report-to", "none"],
           offline_env)
    model, meta = load_exported(str(out))  # a run folder means its best/ model
    _, val, classes = load_image_folder(image_folder, 0.2, 0)
    assert meta["class_names"] == classes
    _, eval_tf = build_transforms(meta["preprocessing"])
    x = torch.stack([eval_tf(row["image"].convert("RGB")) for row in val])
    with torch.no_grad():
        pred = model(x).argmax(-1)
    acc = (pred == torch.tensor(val["label"])).float().mean().item()
    assert acc == pytest.approx(read_results(out)["best_val_accuracy"])


def test_gradient_accumulation_counts_optimiser_steps(image_folder, tmp_path, offline_env):
    out = tmp_path / "run"
    proc = launch("train_finetune.py", ["--data-dir", image_folder, *TINY, "--no-pretrained",
                                        "--epochs", "1", "--gradient-accumulation-steps", "2",
                                        "--output-dir", out, "--report-to", "none"],
                  offline_env)
    res = read_results(out)
    # 18 images / batch 4 = 5 micro-batches -> 3 optimiser steps (the last one partial)
    assert res["steps_per_epoch"] == 3 and res["global_batch_size"] == 8
    assert "global batch 8, 3 optimiser steps/epoch" in proc.stdout


# the fine-tune compiles the whole network: ~80 s of C++ builds with inductor's cache cold
@pytest.mark.parametrize("script", [pytest.param("train_finetune.py", marks=pytest.mark.slow),
                                    "train_extractor.py"])
def test_compile_trains_and_exports_weights_predict_can_load(script, image_folder,
                                                            tiny_weights, tmp_path,
                                                            offline_env):
    """--compile: best/ holds the model's own weights (accelerate's unwrap_model would keep
    torch.compile's wrapper: '_orig_mod.' keys, and the extractor's export failed on them),
    and predict.py reproduces the run's val accuracy from them."""
    out = tmp_path / "run"
    extra = ["--probe-epochs", "0"] if "finetune" in script else []
    launch(script, ["--data-dir", image_folder, *TINY, "--weights", tiny_weights, "--epochs",
                    "1", *extra, "--compile", "--output-dir", out, "--report-to", "none"],
           offline_env)
    keys = load_file(out / "best" / "model.safetensors").keys()
    assert keys and not [k for k in keys if k.startswith("_orig_mod")]
    preds = tmp_path / "preds.csv"
    proc = run_script("predict.py", [out, os.path.join(image_folder, "val"), "--output", preds],
                      offline_env)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(preds)))
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert len(rows) == 9 and correct / 9 == pytest.approx(read_results(out)["best_val_accuracy"])
