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
from common.imagecheck import identity_digest
from common.features import cache_key
from common.models import build_model
from conftest import COLOURS, launch, make_image_folder, write_image


@pytest.fixture
def key_inputs(tmp_path):
    root = make_image_folder(tmp_path / "d", counts={"train": 2, "val": 1})
    train, val, classes = load_image_folder(root, 0.2, 0)
    torch.manual_seed(0)
    built = build_model("timm:test_resnet", len(classes), pretrained=False)
    return root, train, val, built.model, built.head_names, built.preprocessing


SETTINGS = dict(precision="fp32", channels_last=True, device="cpu", batchnorm_folded=False)


def test_cache_key_changes_with_image_model_transform_and_numerics(key_inputs):
    root, train, val, model, heads, pre = key_inputs
    cfg = ExtractorConfig(model="timm:test_resnet")

    def key(cfg=cfg, pre=pre, **settings):
        ids = (identity_digest(train), identity_digest(val))
        return cache_key(model, heads, cfg, pre, ids, settings={**SETTINGS, **settings})

    first = key()
    assert key() == first  # deterministic
    # a changed image (new content, new mtime)
    time.sleep(0.01)
    write_image(os.path.join(root, "val", "cat", "0.jpg"), COLOURS["dog"], seed=99)
    assert key() != first
    first = key()
    # other backbone weights (a new head alone changes nothing: it is not in the features)
    model.get_submodule(heads[0]).weight.data.add_(1)
    assert key() == first
    with torch.no_grad():
        model.conv1[0].weight.add_(1e-3)
    assert key() != first
    first = key()
    # another transform: crop scale, number of views, preprocessing
    assert key(cfg=ExtractorConfig(model="timm:test_resnet", train_crop_scale=0.5)) != first
    assert key(cfg=ExtractorConfig(model="timm:test_resnet", feature_views=2)) != first
    assert key(pre=dict(pre, resize=200)) != first
    # the numbers the features are computed with: bf16 features never stand in for fp32
    assert len({first, key(precision="bf16"), key(channels_last=False),
                key(device="cuda"), key(batchnorm_folded=True)}) == 5


@pytest.mark.parametrize("views", ["1", "2"])  # 1: the default
def test_cached_and_on_the_fly_training_give_the_same_head(views, image_folder, tmp_path,
                                                           offline_env):
    heads, results = [], []
    for mode in ("--cache-features", "--no-cache-features"):
        out = tmp_path / mode
        launch("train_extractor.py", ["--data-dir", image_folder, "--model", "timm:test_resnet",
                                      "--no-pretrained", "--batch-size", "4", "--num-workers",
                                      "0", "--report-to", "none", "--epochs", "3",
                                      "--feature-views", views, "--checkpointing-steps", "no",
                                      # exact only in fp32 (auto: bf16 on CPUs with native
                                      # bf16, AVX512-BF16 or AMX, and the heads then differ)
                                      "--extract-precision", "fp32",
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


def test_a_model_with_two_heads_trains_both_on_cached_features(image_folder, tmp_path,
                                                                offline_env):
    """Distilled DeiT: head and head_dist read different tokens; its eval output is their
    average. Both are new, both train, neither is part of the frozen backbone."""
    from safetensors.torch import load_file as load

    name = "timm:deit_tiny_distilled_patch16_224"
    built = build_model(name, 3, pretrained=False)
    assert built.head_names == ("head", "head_dist")
    outs = {}
    for mode, epochs in (("--cache-features", "2"), ("--no-cache-features", "2"),
                         ("--cache-features", "0")):  # epochs 0: the starting heads
        outs[mode + epochs] = tmp_path / (mode + epochs)
        launch("train_extractor.py", ["--data-dir", image_folder, "--model", name,
                                      "--no-pretrained", "--batch-size", "6", "--num-workers",
                                      "0", "--report-to", "none", "--epochs", epochs,
                                      "--lr", "0.5", "--checkpointing-steps", "no",
                                      "--extract-precision", "fp32",  # exact (as above)
                                      "--feature-cache-dir", tmp_path / "cache",
                                      "--output-dir", outs[mode + epochs], mode], offline_env)
    cached, live, start = (load(str(outs[k] / "best" / "model.safetensors")) for k in
                           ("--cache-features2", "--no-cache-features2", "--cache-features0"))
    for k in ("head.weight", "head_dist.weight"):
        assert not torch.equal(cached[k], start[k]), f"{k} did not train"
        torch.testing.assert_close(cached[k], live[k], rtol=1e-4, atol=1e-5)
    backbone = [k for k in start if not k.startswith(("head.", "head_dist."))]
    assert all(torch.equal(cached[k], start[k]) for k in backbone)
    assert cached["head.weight"].shape == cached["head_dist.weight"].shape == (3, 192)
    assert not torch.equal(cached["head.weight"], cached["head_dist.weight"])
    meta = json.load(open(outs["--cache-features2"] / "best" / "model.json"))
    assert meta["heads"] == ["head", "head_dist"]


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


def test_bf16_extraction_runs_on_the_folded_backbone_fp32_on_the_model_itself(
        image_folder, tiny_weights, tmp_path):
    """--extract-precision bf16 computes the features on a copy with the BatchNorm layers
    folded into the convolutions (common/folding.py): bf16's rounding of the fp32 features,
    which come from the model as it is; the model the heads train in is never changed."""
    from accelerate import Accelerator

    from common.features import cached_feature_loaders

    accelerator = Accelerator(cpu=True)
    train, val, classes = load_image_folder(image_folder, 0.2, 0)
    features = {}
    for precision in ("fp32", "bf16"):
        cfg = ExtractorConfig(model="timm:test_resnet", weights=tiny_weights, batch_size=4,
                              extract_precision=precision,
                              feature_cache_dir=str(tmp_path / "cache"))
        network = build_model(cfg.model, len(classes), True, tiny_weights)
        before = {k: v.clone() for k, v in network.model.state_dict().items()}
        modules = [type(m) for m in network.model.modules()]
        *_, info = cached_feature_loaders(accelerator, cfg, network, train, val, workers=0)
        assert info["extract_precision"] == precision and not info["features_cached"]
        assert info["batchnorm_folded"] == (precision == "bf16")
        assert all(torch.equal(v, before[k]) for k, v in network.model.state_dict().items())
        assert [type(m) for m in network.model.modules()] == modules
        features[precision] = load_file(info["feature_cache"])["val"]
    error = (features["bf16"] - features["fp32"]).norm() / features["fp32"].norm()
    assert 0 < error < 0.05
