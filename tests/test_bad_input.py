"""Bad input ends in a one-line error naming the problem (exit 2; 1 for a failure while
running; no traceback), or in a logged warning and a correct run. Each case runs the real
entry script as a user would."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COLOURS, make_image_folder, run_script, write_image

TINY = ["--model", "timm:test_resnet", "--no-pretrained", "--batch-size", "4",
        "--num-workers", "0", "--report-to", "none"]


def assert_one_line_error(proc, *fragments, status=2):
    """One `error:` line holding every fragment, no traceback, and the exit status: 2 for
    usage and configuration errors, 1 for failures while running."""
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def train(tmp_path, env, *args, script="train_finetune.py", epochs=1):
    out = tmp_path / "run"
    return run_script(script, [*TINY, "--epochs", epochs, "--output-dir", out, *args], env), out


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"),
    ("empty", "expected a train/ folder"),
    ("no_classes", "has no class sub-folders"),
    ("no_images", "no images"),
])
def test_unusable_data_dir(tmp_path, offline_env, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout in ("no_classes", "no_images"):
        (root / "train").mkdir()
    if layout == "no_images":
        (root / "train" / "cat").mkdir()
        (root / "train" / "cat" / "notes.txt").write_text("x")
    proc, _ = train(tmp_path, offline_env, "--data-dir", root)
    assert_one_line_error(proc, f"--data-dir {root}", message)


def test_missing_val_folder_splits_off_a_validation_fraction(tmp_path, offline_env):
    root = make_image_folder(tmp_path / "data", counts={"train": 5}, splits=("train",))
    proc, out = train(tmp_path, offline_env, "--data-dir", root, "--val-split", "x")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no val/ folder: holding out 3 of 15" in proc.stdout
    res = json.load(open(out / "results.json"))
    assert (res["train_samples"], res["val_samples"]) == (12, 3)


def test_train_and_val_classes_differ(tmp_path, offline_env):
    root = make_image_folder(tmp_path / "data", counts={"train": 2, "val": 1})
    os.rename(root + "/val/dog", root + "/val/Dog")
    proc, _ = train(tmp_path, offline_env, "--data-dir", root)
    assert_one_line_error(proc, "different class folders", "only in train: ['dog']",
                          "only in val: ['Dog']")


def _bad_images(root):
    """Three unreadable files and the non-images real folders contain."""
    bad = {"random.jpg": os.urandom(3000), "empty.jpg": b""}
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG")
    bad["truncated.jpg"] = buf.getvalue()[: len(buf.getvalue()) // 2]
    for name, data in bad.items():
        with open(os.path.join(root, "train", "cat", name), "wb") as fh:
            fh.write(data)
    with open(os.path.join(root, "train", "dog", "README.txt"), "w") as fh:
        fh.write("not an image")
    with open(os.path.join(root, "val", "fox", ".DS_Store"), "wb") as fh:
        fh.write(b"\0\0\0\1Bud1")
    write_image(os.path.join(root, "train", "fox", "imageNotFound.gif"), COLOURS["fox"], fmt="GIF")
    return sorted(bad)


def test_unreadable_images_are_skipped_with_a_warning_and_counted(tmp_path, offline_env):
    root = make_image_folder(tmp_path / "data", counts={"train": 3, "val": 2})
    bad = _bad_images(root)
    proc, out = train(tmp_path, offline_env, "--data-dir", root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in bad:
        assert f"skipping unreadable image {os.path.join(root, 'train', 'cat', name)}" in proc.stdout
    assert "skipped 3 unreadable train image(s) of 12" in proc.stdout
    res = json.load(open(out / "results.json"))
    assert (res["train_samples"], res["val_samples"]) == (9, 6)  # .txt/.gif/.DS_Store ignored


def test_strict_images_makes_an_unreadable_image_an_error(tmp_path, offline_env):
    root = make_image_folder(tmp_path / "data", counts={"train": 3, "val": 2})
    _bad_images(root)
    proc, _ = train(tmp_path, offline_env, "--data-dir", root, "--strict-images")
    assert_one_line_error(proc, "--strict-images:", "cannot be read", "3 unreadable train")


def _odd_images(root):
    """Grayscale, CMYK, RGBA, palette, 16-bit, EXIF-rotated and tiny images, one class each."""
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), np.uint8))
    d = os.path.join(root, "train", "cat")
    rgb.convert("L").save(os.path.join(d, "gray.png"))
    rgb.convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    rgb.convert("RGBA").save(os.path.join(d, "rgba.png"))
    rgb.convert("P").save(os.path.join(d, "palette.png"))
    Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16)).save(
        os.path.join(d, "sixteen.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    rgb.save(os.path.join(d, "rotated.jpg"), exif=exif)
    rgb.resize((5, 4)).save(os.path.join(d, "tiny.png"))
    return 7


def test_odd_image_modes_and_sizes_are_converted_and_trained_on(tmp_path, offline_env):
    root = make_image_folder(tmp_path / "data", counts={"train": 2, "val": 1})
    extra = _odd_images(root)
    for script in ("train_finetune.py", "train_extractor.py"):
        proc, out = train(tmp_path / script, offline_env, "--data-dir", root, script=script)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "unreadable" not in proc.stdout
        assert json.load(open(out / "results.json"))["train_samples"] == 6 + extra


def test_sixteen_bit_and_exif_images_decode_correctly(tmp_path):
    import datasets

    from common.images import to_rgb

    _odd_images(make_image_folder(tmp_path / "data", counts={"train": 1}, splits=("train",)))
    d = tmp_path / "data" / "train" / "cat"
    sixteen = to_rgb(Image.open(d / "sixteen.png"))
    arr = np.asarray(sixteen)
    assert sixteen.mode == "RGB" and 60 < arr.mean() < 200  # not clipped to white
    ds = datasets.Dataset.from_dict({"image": [str(d / "rotated.jpg")]}).cast_column(
        "image", datasets.Image())
    assert Image.open(d / "rotated.jpg").size == (30, 40)  # stored 30 wide, 40 high
    assert ds[0]["image"].size == (40, 30)  # EXIF orientation 6 applied


def test_weights_for_another_architecture_name_the_layers(tmp_path, offline_env):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    root = make_image_folder(tmp_path / "data", counts={"train": 1, "val": 1})
    args = [a for a in TINY if a != "--no-pretrained"]
    proc = run_script("train_finetune.py", [*args, "--data-dir", root, "--weights", path,
                                            "--output-dir", tmp_path / "run"], offline_env)
    line = assert_one_line_error(proc, f"--weights {path}", "does not fit this architecture")
    assert "missing: conv1.0.weight" in line and "unexpected: blocks.0" in line


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, offline_env):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, path)
    root = make_image_folder(tmp_path / "data", counts={"train": 1, "val": 1})
    args = [a for a in TINY if a != "--no-pretrained"]
    proc = run_script("train_finetune.py", [*args, "--data-dir", root, "--weights", path,
                                            "--output-dir", tmp_path / "run"], offline_env)
    assert_one_line_error(proc, "refused", "weights_only=True")
    assert not marker.exists()


def _no_network(env):
    """No network, whatever this machine has: every request goes to a closed local port and
    is refused at once (the Hub's HTTP client and torchvision's urllib both honour the proxy
    variables), so these tests never download, with or without a network."""
    for var in ("NO_PROXY", "no_proxy"):
        env.pop(var, None)
    env.update({v: "http://127.0.0.1:9" for v in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy",
                                                  "http_proxy", "ALL_PROXY", "all_proxy")})
    return env


@pytest.mark.parametrize("model", ["resnet18", "timm:resnet18"])
def test_no_network_for_pretrained_weights_fails_fast_naming_weights(tmp_path, offline_env,
                                                                     model):
    import time

    env = _no_network(dict(offline_env, TORCH_HOME=str(tmp_path / "torch")))  # no cache
    env.pop("HF_HUB_OFFLINE")  # the probe must find out by itself
    root = make_image_folder(tmp_path / "data", counts={"train": 1, "val": 1})
    t0 = time.time()
    proc = run_script("train_finetune.py", ["--model", model, "--data-dir", root,
                                            "--output-dir", tmp_path / "run",
                                            "--report-to", "none"], env)
    assert_one_line_error(proc, f"--model {model}", "--weights PATH", status=1)
    assert time.time() - t0 < 45


def test_dataset_without_expected_columns(tmp_path, offline_env):
    from test_data import _parquet_dataset

    path = _parquet_dataset(tmp_path)
    proc, _ = train(tmp_path, offline_env, "--dataset", path, "--image-column", "img")
    assert_one_line_error(proc, "no column 'label' (it has img, species)", "--label-column")


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-3"], "--epochs must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--report-to", "mlflow"], "argument --report-to: invalid choice"),
    (["--model", "resnet181"], "no torchvision or timm model named 'resnet181'; did you mean "
                               "resnet18"),
])
def test_bad_flags_are_rejected_before_any_work(offline_env, argv, message):
    proc = run_script("train_extractor.py", argv, offline_env)
    assert_one_line_error(proc, message)


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path,
                                                                           offline_env):
    root = make_image_folder(tmp_path / "data")
    proc, out = train(tmp_path, offline_env, "--data-dir", root, "--optimizer", "sgd",
                      "--lr", "1e30", "--checkpointing-steps", "1", "--freeze-epochs", "0",
                      epochs=2)
    line = assert_one_line_error(proc, "training loss became", "epoch 1, step", "lower --lr",
                                 status=1)
    assert "nan" in line or "inf" in line
    assert (out / "checkpoints" / "latest").exists() and not (out / "results.json").exists()


def test_output_dir_with_a_finished_run_is_refused_unless_overwritten(tmp_path, offline_env):
    root = make_image_folder(tmp_path / "data", counts={"train": 2, "val": 1})
    proc, out = train(tmp_path, offline_env, "--data-dir", root)
    assert proc.returncode == 0
    (out / "my_notes.txt").write_text("mine")
    proc, _ = train(tmp_path, offline_env, "--data-dir", root)
    assert_one_line_error(proc, f"--output-dir {out} already holds a finished run",
                          "--overwrite-output-dir")
    proc, _ = train(tmp_path, offline_env, "--data-dir", root, "--overwrite-output-dir")
    assert proc.returncode == 0 and "--overwrite-output-dir: removed" in proc.stdout
    assert (out / "my_notes.txt").read_text() == "mine" and (out / "results.json").exists()


def test_resume_from_a_folder_we_did_not_write_is_refused(tmp_path, offline_env):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with open(ckpt / "random_states_0.pkl", "wb") as fh:
        pickle.dump(_Evil(marker), fh)
    root = make_image_folder(tmp_path / "data", counts={"train": 1, "val": 1})
    proc, _ = train(tmp_path, offline_env, "--data-dir", root, "--resume-from-checkpoint", ckpt)
    assert_one_line_error(proc, f"--resume-from-checkpoint {ckpt}", "not a checkpoint written",
                          status=1)  # a refused checkpoint: a failure while running
    assert not marker.exists()


def test_hub_dataset_without_network_fails_fast_naming_local_options(tmp_path, offline_env):
    import time

    env = _no_network(dict(offline_env))
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_DATASETS_OFFLINE")
    t0 = time.time()
    proc, _ = train(tmp_path, env, "--dataset", "beans")
    assert_one_line_error(proc, "--dataset beans: could not load it", "--data-dir DIR")
    assert time.time() - t0 < 120  # 10-35 s here, most of it imports; no endless retries


def _classlabel_parquet(root, val_labels, val_names=("cat", "dog"), val_split="test"):
    """A parquet dataset whose label column is a ClassLabel (kept in the parquet metadata,
    as on the Hub): train labelled 0/1, the val split with `val_labels` (-1: unlabelled)."""
    import datasets

    out = root / "pq"
    out.mkdir(parents=True)
    for split, labels, names in (("train", [0, 1] * 4, ("cat", "dog")),
                                 (val_split, val_labels, val_names)):
        files = [write_image(str(root / "imgs" / split / f"{i}.png"),
                             list(COLOURS.values())[max(lab, 0)], seed=i)
                 for i, lab in enumerate(labels)]
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=list(names))})
        datasets.Dataset.from_dict({"image": files, "label": labels}, features=features) \
            .to_parquet(str(out / f"{split}-00000.parquet"))
    return str(out)


@pytest.mark.parametrize("streaming", [False, True])
def test_labels_outside_the_classes_are_one_line_before_training(tmp_path, offline_env,
                                                                 streaming):
    """A Hub `test` split with -1 labels ('unlabelled') used as val: refused naming the split
    and the value, never a crash at the first loss (a device-side assert on CUDA)."""
    path = _classlabel_parquet(tmp_path, [0, 1, -1, 1])
    proc, out = train(tmp_path, offline_env, "--dataset", path,
                      *(["--streaming"] if streaming else []))
    assert_one_line_error(proc, f"--dataset {path}: the test split has label -1",
                          "--val-split")
    assert not (out / "results.json").exists()


def test_streaming_val_label_unknown_to_train_is_the_same_error_as_without(
        tmp_path, offline_env):
    from test_data import _int_label_dataset

    path = _int_label_dataset(tmp_path, [3, 7, 3, 7, 3, 7, 3, 7], [3, 9])
    lines = []
    for flags in ([], ["--streaming"]):
        proc, _ = train(tmp_path / str(len(flags)), offline_env, "--dataset", path, *flags)
        lines.append(assert_one_line_error(proc, "the validation split has labels that "
                                                 "train does not (9)"))
    assert lines[0] == lines[1]

