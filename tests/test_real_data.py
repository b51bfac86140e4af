"""Real ants/bees data with genuinely pretrained EfficientNet-Lite0 weights (slow: minutes).

Run with `python -m pytest -m slow`; skipped where ../shared (or $TL_SHARED_DIR) is absent.
"""

import json

import pytest

from conftest import launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script", ["train_extractor.py", "train_finetune.py"])
def test_reaches_90_percent_in_3_epochs(script, shared_dir, tmp_path, offline_env):
    out = tmp_path / "run"
    launch(script, ["--data-dir", shared_dir["data"], "--model", "timm:tf_efficientnet_lite0",
                    "--weights", shared_dir["weights"], "--epochs", "3", "--output-dir", out,
                    "--report-to", "none"], offline_env, timeout=1200)
    res = json.load(open(out / "results.json"))
    assert res["train_samples"] == 244 and res["val_samples"] == 153  # the .gif is not counted
    assert res["best_val_accuracy"] >= 0.90, res
