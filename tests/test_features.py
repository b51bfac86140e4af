"""The extractor's feature cache: keyed so stale features are never reused, and training on
it gives the same head as running the frozen backbone every epoch."""

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from common.config import ExtractorConfig
from common.data import load_image_folder
from common.features import cache_key
from common.models import build_model
from conftest import COLOURS, launch, make_image_folder, write_image


@pytest.fixture
def key_inputs(tmp_path):
    root = make_image_folder(tmp_path / "d", counts={"train": 2, "val": 1})
    train, val, classes = load_image_folder(root, 0.2, 0)
    torch.manual_seed(0)
    model, head, pre = build_model("timm:test_resnet", len(classes), pretrained=False)
    return root, train, val, model, head, pre


def test_cache_key_changes_with_image_model_and_transform(key_inputs):
    root, train, val, model, head, pre = key_inputs
    cfg = ExtractorConfig(model="timm:test_resnet")
    key = cache_key(model, head, cfg, pre, train, val)
    assert cache_key(model, head, cfg, pre, train, val) == key  # deterministic
    # a changed image (new content, new mtime)
    time.sleep(0.01)
    write_image(os.path.join(root, "val", "cat", "0.jpg"), COLOURS["dog"], seed=99)
    assert cache_key(model, head, cfg, pre, train, val) != key
    key = cache_key(model, head, cfg, pre, train, val)
    # other backbone weights (a new head alone changes nothing: it is not in the features)
    model.get_submodule(head).weight.data.add_(1)
    assert cache_key(model, head, cfg, pre, train, val) == key
    with torch.no_grad():
        model.conv1[0].weight.add_(1e-3)
    assert cache_key(model, head, cfg, pre, train, val) != key
    key = cache_key(model, head, cfg, pre, train, val)
    # another transform: crop scale, number of views, preprocessing
    assert cache_key(model, head, ExtractorConfig(model="timm:test_resnet",
                                                  train_crop_scale=0.5), pre, train, val) != key
    assert cache_key(model, head, ExtractorConfig(model="timm:test_resnet", feature_views=2),
                     pre, train, val) != key
    assert cache_key(model, head, cfg, dict(pre, resize=200), train, val) != key


def test_cached_and_on_the_fly_training_give_the_same_head(image_folder, tmp_path,
                                                           offline_env):
    heads, results = [], []
    for mode in ("--cache-features", "--no-cache-features"):
        out = tmp_path / mode
        launch("train_extractor.py", ["--data-dir", image_folder, "--model", "timm:test_resnet",
                                      "--no-pretrained", "--batch-size", "4", "--num-workers",
                                      "0", "--report-to", "none", "--epochs", "3",
                                      "--feature-views", "0", "--checkpointing-steps", "no",
                                      "--feature-cache-dir", tmp_path / "cache",
                                      "--output-dir", out, mode], offline_env)
        heads.append(load_file(str(out / "best" / "model.safetensors")))
        results.append(json.load(open(out / "results.json")))
    cached, live = heads
    for k in cached:
        torch.testing.assert_close(cached[k], live[k], rtol=1e-4, atol=1e-5)
    assert results[0]["best_val_accuracy"] == results[1]["best_val_accuracy"]
    assert results[0]["final_val_loss"] == pytest.approx(results[1]["final_val_loss"], rel=1e-4)
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_second_run_reuses_the_cache(image_folder, tmp_path, offline_env):
    args = ["--data-dir", image_folder, "--model", "timm:test_resnet", "--no-pretrained",
            "--batch-size", "4", "--num-workers", "0", "--report-to", "none", "--epochs", "1",
            "--feature-views", "2", "--feature-cache-dir", tmp_path / "cache"]
    first = launch("train_extractor.py", [*args, "--output-dir", tmp_path / "a"], offline_env,
                   nproc=2)
    assert "features: (18, 2, " in first.stdout
    second = launch("train_extractor.py", [*args, "--output-dir", tmp_path / "b"], offline_env)
    assert "features: cached in" in second.stdout
    a, b = (json.load(open(tmp_path / x / "results.json")) for x in "ab")
    assert a["val_samples"] == b["val_samples"] == 9
