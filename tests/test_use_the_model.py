"""Pictures of a run, compare_runs.py and predict.py, as a user runs them."""

import csv
import json
import os

import pytest
from PIL import Image

from conftest import launch, make_image_folder, run_script

TINY = ["--model", "timm:test_resnet", "--no-pretrained", "--batch-size", "4",
        "--num-workers", "0", "--report-to", "none"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, offline_env):
    root = tmp_path_factory.mktemp("d")
    data = make_image_folder(root / "data")
    runs = []
    for script, epochs in (("train_finetune.py", 2), ("train_extractor.py", 3)):
        out = root / script.split("_")[1].removesuffix(".py")
        launch(script, ["--data-dir", data, *TINY, "--epochs", epochs, "--output-dir", out],
               offline_env)
        runs.append(out)
    return data, runs


def test_run_folder_has_pictures_that_open(two_runs):
    _, runs = two_runs
    for run in runs:
        for name in ("confusion_matrix.png", "predictions.png", "augmentation.png"):
            with Image.open(run / name) as img:
                img.verify()
            with Image.open(run / name) as img:
                assert img.format == "PNG" and img.width > 300 and img.height > 300


def test_compare_runs_prints_both_and_draws_curves(two_runs, tmp_path, offline_env):
    _, runs = two_runs
    png = tmp_path / "curves.png"
    proc = run_script("compare_runs.py", [*runs, "--output", png], offline_env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "script", "model"]
    finetune = next(line for line in lines if line.startswith("finetune"))
    extractor = next(line for line in lines if line.startswith("extractor"))
    best = json.load(open(runs[1] / "results.json"))["best_val_accuracy"]
    assert "timm:test_resnet" in finetune and f"{best:.4f}" in extractor
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 800


def test_compare_runs_on_a_folder_that_is_not_a_run(tmp_path, offline_env):
    proc = run_script("compare_runs.py", [tmp_path], offline_env)
    assert proc.returncode == 2 and "no results.json" in proc.stderr


def test_predict_reproduces_the_runs_val_accuracy(two_runs, tmp_path, offline_env):
    data, runs = two_runs
    out = tmp_path / "pred.csv"
    proc = run_script("predict.py", [runs[0], os.path.join(data, "val"), "--output", out],
                      offline_env)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["path", "label", "probability"] and len(rows) == 9
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert correct / 9 == pytest.approx(json.load(open(runs[0] / "results.json"))
                                        ["best_val_accuracy"])


def test_predict_top_k_jsonl_and_console(two_runs, tmp_path, offline_env):
    data, runs = two_runs
    out = tmp_path / "pred.jsonl"
    proc = run_script("predict.py", [runs[1] / "best", os.path.join(data, "val", "cat", "0.jpg"),
                                     "--top-k", "2", "--output", out], offline_env)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in open(out)]
    assert [r["rank"] for r in recs] == [1, 2] and recs[0]["probability"] >= recs[1]["probability"]
    proc = run_script("predict.py", [runs[1], os.path.join(data, "val", "dog")], offline_env)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.count(", ") == 2 for line in lines)
    proc = run_script("predict.py", [tmp_path, "x.jpg"], offline_env)
    assert proc.returncode == 2 and "no exported model here" in proc.stderr
