"""Real ants/bees data with genuinely pretrained EfficientNet-Lite0 weights (slow: minutes).

Run with `python -m pytest -m slow`; skipped where ../shared (or $TL_SHARED_DIR) is absent.
"""

import json

import pytest

from conftest import launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("script,epochs", [("train_extractor.py", "3"), ("train_finetune.py", "1")])
def test_reaches_90_percent_in_a_few_epochs(script, epochs, shared_dir, tmp_path, offline_env):
    # (the fine-tune's linear probe comes first; one all-layer epoch keeps CI short)
    out = tmp_path / "run"
    launch(script, ["--data-dir", shared_dir["data"], "--model", "timm:tf_efficientnet_lite0",
                    "--weights", shared_dir["weights"], "--epochs", epochs, "--output-dir", out,
                    "--report-to", "none"], offline_env, timeout=1200)
    res = json.load(open(out / "results.json"))
    assert res["train_samples"] == 244 and res["val_samples"] == 153  # the .gif is not counted
    assert res["best_val_accuracy"] >= 0.90, res


def test_kill_9_halfway_then_resume_matches_uninterrupted(shared_dir, tmp_path, offline_env):
    import signal

    from test_resume import start_and_interrupt

    args = ["--data-dir", shared_dir["data"], "--model", "timm:tf_efficientnet_lite0",
            "--weights", shared_dir["weights"], "--epochs", "1", "--batch-size", "16",
            "--max-train-steps", "6", "--checkpointing-steps", "2", "--probe-epochs", "0",
            "--report-to", "none"]
    full = tmp_path / "full"
    launch("train_finetune.py", [*args, "--output-dir", full], offline_env, timeout=1200)
    out = tmp_path / "killed"
    # 6 steps of 16 images (of the epoch's 16: a time box keeps CI short, the val pass is whole),
    # killed once the step-4 checkpoint is written, so the resumed run trains steps 5-6
    start_and_interrupt(args, out, offline_env, signal.SIGKILL, after_step=3)
    launch("train_finetune.py", [*args, "--output-dir", out, "--resume-from-checkpoint",
                                 "latest"], offline_env, timeout=1200)
    a, b = (json.load(open(p / "results.json")) for p in (full, out))
    assert b["val_samples"] == a["val_samples"] == 153
    assert a["optimizer_steps"] == b["optimizer_steps"] == 6
    # exact here (per-sample augmentation seeds, restored RNG); the spec allows one image
    assert abs(a["final_val_accuracy"] - b["final_val_accuracy"]) * 153 <= 1
    assert abs(a["best_val_accuracy"] - b["best_val_accuracy"]) * 153 <= 1
    print(f"uninterrupted {a['final_val_accuracy']:.4f}, killed+resumed {b['final_val_accuracy']:.4f}")


def test_predict_on_val_equals_the_runs_best_accuracy(shared_dir, tmp_path, offline_env):
    import csv
    import os

    from conftest import run_script

    out = tmp_path / "run"
    launch("train_extractor.py", ["--data-dir", shared_dir["data"], "--model",
                                  "timm:tf_efficientnet_lite0", "--weights",
                                  shared_dir["weights"], "--epochs", "2", "--output-dir", out,
                                  "--report-to", "none"], offline_env, timeout=1200)
    csv_path = tmp_path / "pred.csv"
    proc = run_script("predict.py", [out, os.path.join(shared_dir["data"], "val"), "--output",
                                     csv_path], offline_env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 153
    correct = sum(r["label"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    best = json.load(open(out / "results.json"))["best_val_accuracy"]
    assert abs(correct / 153 - best) * 153 < 1, (correct, best)
