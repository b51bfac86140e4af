"""--image-size auto: images much smaller than the model's input are trained, evaluated and
exported at a size of their own; everything else at the model's input size."""

import csv
import json
import os

import pytest

from common.image_size import at_image_size, choose_image_size, median_short_side
from conftest import launch, make_image_folder, run_script
from test_bad_input import TINY


@pytest.mark.parametrize("median, side", [
    (32, 128),    # cifar10: BiT's 128 for images under 96 px
    (60, 128),
    (80, 160),    # twice the median, a multiple of 32
    (100, 224),   # 2 x 100 rounds up to the input size
    (112, 224),   # half the input size: twice it is the input
    (149, 224),   # hotdog's median: more than half, the input size
    (400, 224),
    (None, 224),  # nothing readable: the input size
])
def test_auto_trains_at_twice_the_median_side_when_images_are_at_most_half_the_input(
        median, side):
    assert choose_image_size("auto", 224, False, median)[0] == side


def test_a_fixed_input_size_and_an_asked_size_are_kept():
    assert choose_image_size("auto", 224, True, 32) == (224, "the model's fixed input size")
    assert choose_image_size(96, 224, False, 400) == (96, "--image-size 96")
    assert choose_image_size("auto", 224, False, 32, shrink=False)[0] == 224  # the extractor
    p = at_image_size({"input_size": 224, "resize": 256, "mean": [0.5] * 3}, 128)
    assert (p["input_size"], p["resize"], p["mean"]) == (128, 146, [0.5] * 3)


def test_median_side_reads_headers_of_a_sample(tmp_path):
    from common.data import load_image_folder

    root = make_image_folder(tmp_path / "d")  # 48 x 40 images
    train, _, _ = load_image_folder(root, 0.2, 0)
    assert median_short_side(train) == 40


def test_small_images_train_evaluate_and_export_at_their_size(tmp_path, offline_env):
    """test_resnet's input is 160 px; 40-px images fine-tune at 128, and best/, the model
    card, results.json and predict.py all use 128; the extractor keeps 160 unless asked."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = launch("train_finetune.py", ["--data-dir", data, *TINY, "--epochs", "1",
                                        "--output-dir", out], offline_env)
    assert "images at 128 px (the training images' median side is 40 px" in proc.stdout
    res = json.load(open(out / "results.json"))
    meta = json.load(open(out / "best" / "model.json"))
    assert res["image_size"] == meta["preprocessing"]["input_size"] == 128
    assert "training images at 128 px" in open(out / "best" / "README.md").read()
    pred = tmp_path / "p.csv"
    assert run_script("predict.py", [out, os.path.join(data, "val"), "--output", pred],
                      offline_env).returncode == 0
    rows = list(csv.DictReader(open(pred)))
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert correct / len(rows) == pytest.approx(res["best_val_accuracy"])
    for size, flags in ((160, []), (96, ["--image-size", "96"])):
        launch("train_extractor.py", ["--data-dir", data, *TINY, "--epochs", "1", *flags,
                                      "--output-dir", tmp_path / f"x{size}"], offline_env)
        assert json.load(open(tmp_path / f"x{size}" / "results.json"))["image_size"] == size
