"""Sharing the trained model: a timm/Hub folder with a model card, ONNX and TorchScript
exports checked against PyTorch, calibrated probabilities, test-time augmentation, top
losses, every class's probability."""

import csv
import json
import os

import pytest
import torch
from PIL import Image

from conftest import launch, make_image_folder, run_script

TINY = ["--model", "timm:test_resnet", "--batch-size", "4", "--num-workers", "0",
        "--report-to", "none", "--image-size", "160"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, offline_env, tiny_weights):
    """A fine-tuned tiny model whose val accuracy is well above chance."""
    root = tmp_path_factory.mktemp("share")
    data = make_image_folder(root / "data", counts={"train": 8, "val": 4})
    out = root / "run"
    launch("train_finetune.py", ["--data-dir", data, *TINY, "--weights", tiny_weights,
                                 "--epochs", "3", "--probe-epochs", "0", "--optimizer", "sgd",
                                 "--lr", "0.1", "--output-dir", out], offline_env)
    return data, out, json.load(open(out / "results.json"))


def test_best_is_a_timm_folder_that_timm_loads_with_its_own_transform(trained):
    import timm

    data, out, res = trained
    model = timm.create_model(f"local-dir:{out / 'best'}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == res["class_names"]
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    correct = total = 0
    for label, name in enumerate(res["class_names"]):
        folder = os.path.join(data, "val", name)
        for f in sorted(os.listdir(folder)):
            x = transform(Image.open(os.path.join(folder, f)).convert("RGB"))[None]
            with torch.no_grad():
                correct += int(model(x).argmax(-1).item() == label)
            total += 1
    assert total == res["val_samples"] == 12
    assert res["best_val_accuracy"] >= 8 / 12, res  # chance: 4 of 12
    assert correct == round(res["best_val_accuracy"] * total)


def test_model_card_states_the_accuracy_its_interval_and_how_to_load(trained):
    _, out, res = trained
    from huggingface_hub import ModelCard

    card = (out / "best" / "README.md").read_text()
    meta = ModelCard.load(out / "best" / "README.md").data  # the Hub's own parser
    assert meta.library_name == "timm" and meta.pipeline_tag == "image-classification"
    assert meta.eval_results[0].metric_value == round(res["best_val_accuracy"], 4)
    assert meta.base_model is None  # a --weights file: no Hub model to link to
    low, high = res["best_val_accuracy_ci95"]
    assert f"**{res['best_val_accuracy']:.4f}**" in card and f"{low:.3f}-{high:.3f}" in card
    assert 'folder = "local-dir:PATH/TO/THIS/FOLDER"' in card
    assert "timm.create_model(folder, pretrained=True)" in card
    assert "predict.py" in card
    assert "## Limitations" in card and "| cat |" in card
    assert (out / "best" / "confusion_matrix.png").exists()


def test_model_card_metadata_is_valid_with_any_class_or_folder_name(tmp_path, offline_env,
                                                                     tiny_weights):
    """Names YAML would misread (": ", "#") end up quoted in the card's metadata; the data's
    local path is not in the card, only its folder's name."""
    from huggingface_hub import ModelCard

    data = make_image_folder(tmp_path / "private" / "flowers: v2 #3")
    for split in ("train", "val"):
        os.rename(os.path.join(data, split, "cat"), os.path.join(data, split, "cat: tabby #1"))
    out = tmp_path / "run"
    launch("train_extractor.py", ["--data-dir", data, *TINY, "--weights", tiny_weights,
                                  "--epochs", "1", "--output-dir", out], offline_env)
    text = (out / "best" / "README.md").read_text()
    card = ModelCard.load(out / "best" / "README.md")
    result = card.data.eval_results[0]
    assert (result.dataset_name, result.dataset_type) == ("flowers: v2 #3", "imagefolder")
    assert "| cat: tabby #1 |" in text
    assert "private" not in text and str(tmp_path) not in text


@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_export_matches_pytorch_and_predict_reads_onnx(fmt, name, trained, tmp_path,
                                                        offline_env):
    data, out, res = trained
    # ONNX into the model's own folder (the default), TorchScript where --output says
    written = out / "best" / name if fmt == "onnx" else tmp_path / name
    proc = run_script("export.py", [out, "--format", fmt]
                      + (["--output", written] if fmt != "onnx" else []), offline_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"-> {written}:" in proc.stdout and written.is_file()
    assert "labels agree 12/12" in proc.stdout
    if fmt != "onnx":
        return
    rows = {}
    for model in (out, written):
        csv_path = tmp_path / f"{os.path.basename(str(model))}.csv"
        proc = run_script("predict.py", [model, os.path.join(data, "val"), "--output",
                                         csv_path, "--probabilities"], offline_env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[model] = list(csv.DictReader(open(csv_path)))
    torch_rows, onnx_rows = rows[out], rows[written]
    assert [r["label"] for r in torch_rows] == [r["label"] for r in onnx_rows]
    for a, b in zip(torch_rows, onnx_rows):
        for c in res["class_names"]:
            assert abs(float(a[f"p_{c}"]) - float(b[f"p_{c}"])) < 1e-3
        assert sum(float(a[f"p_{c}"]) for c in res["class_names"]) == pytest.approx(1, abs=1e-4)


def test_temperature_scaling_reduces_the_calibration_error_and_keeps_the_labels():
    from common.calibration import expected_calibration_error, fit_temperature

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (400,), generator=g)
    logits = torch.randn(400, 3, generator=g)
    logits[torch.arange(400), labels] += 1.0  # right ~2/3 of the time...
    logits *= 6  # ...with near-certain probabilities: over-confident
    t = fit_temperature(logits, labels)
    assert t > 2
    before, after = expected_calibration_error(logits, labels), \
        expected_calibration_error(logits, labels, t)
    assert after < before / 2
    assert torch.equal((logits / t).argmax(-1), logits.argmax(-1))


def test_results_and_export_carry_the_calibration_and_predict_applies_it(trained, tmp_path,
                                                                         offline_env):
    data, out, res = trained
    meta = json.load(open(out / "best" / "model.json"))
    assert meta["temperature"] == res["temperature"] and 0.1 <= res["temperature"] <= 10
    assert {"val_ece", "val_ece_calibrated"} <= res.keys()
    assert res["val_ece_calibrated"] <= res["val_ece"] + 1e-9
    from common.export import load_exported
    from predict import predict

    model, meta = load_exported(str(out))
    files = [os.path.join(data, "val", "dog", "0.jpg")]
    calibrated = predict(model, meta, files)[0][2]
    assert calibrated == pytest.approx(_top_prob(model, meta, files[0], meta["temperature"]),
                                       abs=1e-5)
    # whatever temperature this run fitted, predict divides the logits by the one it is given
    hot = predict(model, dict(meta, temperature=3.0), files)[0][2]
    assert hot == pytest.approx(_top_prob(model, meta, files[0], 3.0), abs=1e-5)
    assert hot != pytest.approx(_top_prob(model, meta, files[0], 1.0), abs=1e-4)


def _top_prob(model, meta, path, temperature):
    """The top class's probability of softmax(logits / temperature), computed here."""
    from common.data import build_transforms

    _, tf = build_transforms(meta["preprocessing"])
    with torch.no_grad():
        logits = model(tf(Image.open(path).convert("RGB"))[None])[0]
    return (logits / temperature).softmax(-1).max().item()


def test_tta_averages_the_mirror_image_in_predict_and_in_evaluation(trained, tmp_path,
                                                                    offline_env):
    from common.data import build_transforms
    from common.export import load_exported
    from predict import predict

    data, out, res = trained
    model, meta = load_exported(str(out))
    # an asymmetric image: left half red, right half green
    arr = torch.zeros(40, 48, 3, dtype=torch.uint8)
    arr[:, :24, 0], arr[:, 24:, 1] = 220, 220
    path = tmp_path / "half.png"
    Image.fromarray(arr.numpy()).save(path)
    plain = predict(model, meta, [str(path)])[0][4]
    tta = predict(model, meta, [str(path)], tta=True)[0][4]
    _, tf = build_transforms(meta["preprocessing"])
    x = tf(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        want = ((model(x) + model(x.flip(-1))) / 2 / meta["temperature"]).softmax(-1)[0]
    assert list(tta.values()) == pytest.approx(want.tolist(), abs=1e-5)
    assert list(tta.values()) != pytest.approx(list(plain.values()), abs=1e-6)
    # the same during training: --tta evaluation
    run = tmp_path / "tta"
    launch("train_finetune.py", ["--data-dir", data, *TINY, "--no-pretrained", "--epochs", "0",
                                 "--tta", "--output-dir", run], offline_env)
    assert json.load(open(run / "results.json"))["val_samples"] == 12


def test_top_losses_picture_and_run_pictures_open(trained):
    _, out, _ = trained
    for name in ("top_losses.png", "predictions.png", "confusion_matrix.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300
