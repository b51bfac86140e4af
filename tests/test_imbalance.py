"""Imbalanced classes on real data: one class of the shared `clothing` set cut to 10% of its
training images. Weighting the loss or balancing the sampler must raise balanced accuracy
and the rare class's recall over plain training (slow: real images, EfficientNet-Lite0)."""

import json
import os
import shutil

import pytest

from conftest import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imbalanced(shared_dir, tmp_path_factory):
    src = os.path.join(shared_dir["root"], "data", "clothing")
    if not os.path.isdir(src):
        pytest.skip(f"{src} not found")
    root = tmp_path_factory.mktemp("imbalanced")
    shutil.copytree(os.path.join(src, "val"), root / "val")
    for cls in sorted(os.listdir(os.path.join(src, "train"))):
        files = sorted(os.listdir(os.path.join(src, "train", cls)))
        keep = files[:len(files) // 10] if cls == "shorts" else files  # 99 -> 9
        os.makedirs(root / "train" / cls)
        for f in keep:
            shutil.copy(os.path.join(src, "train", cls, f), root / "train" / cls / f)
    return str(root)


def test_class_weights_and_balanced_sampler_raise_balanced_accuracy(imbalanced, shared_dir,
                                                                     tmp_path, offline_env):
    results = {}
    for name, extra in (("plain", []), ("weights", ["--class-weights", "auto"]),
                        ("sampler", ["--sampler", "balanced"])):
        out = tmp_path / name
        launch("train_extractor.py", ["--data-dir", imbalanced, "--model",
                                      "timm:tf_efficientnet_lite0", "--weights",
                                      shared_dir["weights"], "--report-to", "none",
                                      "--feature-cache-dir", tmp_path / "cache",
                                      # fp32 features on every CPU (auto: bf16 where native):
                                      # the sampler's margin is thin (README), and it was
                                      # measured on fp32 features
                                      "--extract-precision", "fp32",
                                      "--output-dir", out, *extra], offline_env, timeout=1200)
        results[name] = json.load(open(out / "results.json"))
        print(name, results[name]["best_val_balanced_accuracy"],
              results[name]["best_val_per_class"]["shorts"]["recall"])  # shown with -s
    plain = results["plain"]
    assert plain["train_samples"] == 900  # 9 x 99 + 9
    for name in ("weights", "sampler"):
        r = results[name]
        assert r["best_val_balanced_accuracy"] > plain["best_val_balanced_accuracy"], name
        assert r["best_val_per_class"]["shorts"]["recall"] > \
            plain["best_val_per_class"]["shorts"]["recall"] + 0.05, name
