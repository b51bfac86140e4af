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


def _fp32_loss_and_accuracy(best_dir, val_dir):
    """The exported model's val loss and accuracy, fp32, computed here as predict.py
    loads and preprocesses (no temperature)."""
    import torch
    import torch.nn.functional as F

    from common.data import build_transforms, image_files
    from common.export import load_exported
    from common.images import decode_image, decode_sizes

    model, meta = load_exported(str(best_dir))
    _, tf = build_transforms(meta["preprocessing"])
    _, side = decode_sizes(meta["preprocessing"])
    files = image_files(val_dir)
    x = torch.stack([tf(decode_image(f, side)) for f in files])
    y = torch.tensor([meta["class_names"].index(os.path.basename(os.path.dirname(f)))
                      for f in files])
    with torch.no_grad():
        logits = model(x).float()
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def test_bf16_features_report_the_exported_models_figures_and_epoch_0_is_the_extractor(
        tmp_path, offline_env, tiny_weights):
    """bf16 extraction (a folded bf16 copy of the backbone) trains and chooses the head; the
    reported figures are best/'s own, fp32 on the val images: predict.py's accuracy, the
    loss to 1e-5, and the fine-tune's epoch 0 (the probe) the extractor's model and number."""
    data = make_image_folder(tmp_path / "data")
    args = ["--data-dir", data, "--model", "timm:test_resnet", "--weights", tiny_weights,
            "--batch-size", "4", "--num-workers", "0", "--report-to", "none",
            "--extract-precision", "bf16", "--image-size", "128"]  # one size for both
    ext, ft = tmp_path / "ext", tmp_path / "ft"
    launch("train_extractor.py", [*args, "--epochs", "3", "--output-dir", ext], offline_env)
    launch("train_finetune.py", [*args, "--epochs", "1", "--probe-epochs", "3",
                                 "--output-dir", ft], offline_env)
    val = os.path.join(data, "val")
    for run in (ext, ft):
        res = json.load(open(run / "results.json"))
        loss, accuracy = _fp32_loss_and_accuracy(run / "best", val)
        assert res["best_val_loss"] == pytest.approx(loss, rel=1e-5), run
        assert res["best_val_accuracy"] == pytest.approx(accuracy), run
        out = tmp_path / f"{run.name}.csv"
        assert run_script("predict.py", [run, val, "--output", out],
                          offline_env).returncode == 0
        rows = list(csv.DictReader(open(out)))
        correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
        assert correct / len(rows) == pytest.approx(res["best_val_accuracy"]), run
    extractor = json.load(open(ext / "results.json"))
    assert extractor["extract_precision"] == "bf16" and extractor["batchnorm_folded"]
    # on 2 processes best/ is scored sharded (rank 0's file broadcast to a channels-last
    # copy): the same figures as on 1 (the start model, so that both score the same head)
    for n in (1, 2):
        launch("train_extractor.py", [*args, "--epochs", "0", "--output-dir",
                                      tmp_path / f"start{n}"], offline_env, nproc=n)
    one, two = (json.load(open(tmp_path / f"start{n}" / "results.json")) for n in (1, 2))
    assert two["best_val_loss"] == pytest.approx(one["best_val_loss"], rel=1e-5)
    assert extractor["best_scored_again_because"] == "chosen on bf16 features"
    epoch0 = json.loads(open(ft / "metrics.jsonl").readline())
    assert epoch0["epoch"] == 0 and epoch0["stage"] == "probe"
    assert epoch0["val_loss"] == pytest.approx(extractor["best_val_loss"], rel=1e-5)
    assert epoch0["val_accuracy"] == extractor["best_val_accuracy"]
