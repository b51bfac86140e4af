"""Out of the box: the tutorial's data and pretrained weights come with the install, and the
README's first command trains with no network at all."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO, launch


def test_bundled_weights_are_the_shared_lite0_file_tensor_for_tensor(shared_dir):
    from safetensors.torch import load_file

    from common.models import build_model

    built = build_model("tf_efficientnet_lite0", 1000)  # timm's name: the bundled weights
    reference = load_file(shared_dir["weights"])
    own = built.model.state_dict()
    body = [k for k in reference if not k.startswith("classifier.")]
    assert len(body) == 294 and set(reference) == set(own)
    for k in body:
        assert torch.equal(own[k], reference[k]), k
    assert built.preprocessing == dict(input_size=224, resize=256, mean=[0.5] * 3,
                                       std=[0.5] * 3, interpolation="bicubic")


def test_a_weights_file_that_does_not_map_is_refused(tmp_path, monkeypatch):
    import timm

    from common import pretrained
    from common.errors import UserError

    model = timm.create_model("tf_efficientnet_lite0")
    mapped = pretrained.bundled_state_dict(model)
    assert list(mapped) == list(model.state_dict())
    # the former name builds the same network with the same weights
    from common.models import build_model

    old, new = (build_model(n, 2).model.state_dict()
                for n in ("efficientnet_lite0", "tf_efficientnet_lite0"))
    assert all(torch.equal(old[k], new[k]) for k in new if not k.startswith("classifier"))
    # a file that is not the pinned one
    bad = tmp_path / "lite0.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    monkeypatch.setattr(pretrained, "_weights_file", lambda: str(bad))
    with pytest.raises(UserError, match="sha256 differs"):
        pretrained.bundled_state_dict(model)


def test_the_shipped_ants_bees_copy_is_the_tutorials_split_and_is_checked(tmp_path,
                                                                         monkeypatch):
    from common import download
    from common.data import load_image_folder
    from common.errors import UserError

    path = download.bundled_hymenoptera()
    train, val, classes = load_image_folder(path, 0.2, 0)
    assert classes == ["ants", "bees"] and (len(train), len(val)) == (244, 153)
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".jpg")]
    assert sum(os.path.getsize(f) for f in files) < 13 * 2 ** 20
    from PIL import Image

    assert all(min(Image.open(f).size) <= 320 for f in files[::20])
    broken = tmp_path / "copy"
    shutil.copytree(path, broken)
    os.remove(broken / "val" / "bees" / sorted(os.listdir(broken / "val" / "bees"))[0])
    monkeypatch.setattr(download, "BUNDLED_HYMENOPTERA", str(broken))
    with pytest.raises(UserError, match="incomplete"):
        download.bundled_hymenoptera()


def _no_network_prefix(tmp_path):
    """A command prefix that runs with no network: a new network namespace (only loopback)
    where the kernel allows it, else a socket guard that refuses every non-loopback address,
    loaded into every Python process through sitecustomize."""
    probe = ["unshare", "-rn", "sh", "-c", "ip link set lo up"]
    if shutil.which("unshare") and shutil.which("ip") and \
            subprocess.run(probe, capture_output=True).returncode == 0:
        return ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"], {}
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(
        "import socket\n_connect = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in "
        "('127.0.0.1', '::1', 'localhost'):\n"
        "        raise OSError(101, 'Network is unreachable (test guard)')\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = connect\n")
    return [], {"PYTHONPATH": str(guard), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.mark.launch
def test_readme_command_trains_with_no_network_no_data_and_no_weights(tmp_path):
    """README: `accelerate launch --config_file accelerate_configs/cpu.yaml train_finetune.py`
    (here with --epochs 1 to be quick), from a folder with nothing in it, no caches."""
    prefix, extra_env = _no_network_prefix(tmp_path)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "WANDB_", "TRANSFORMERS_", "TORCH_HOME", "XDG_"))}
    env.update(HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1", **extra_env)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    out = tmp_path / "run"
    cmd = [*prefix, accelerate, "launch", "--config_file", os.path.join(CONFIGS, "cpu.yaml"),
           os.path.join(REPO, "train_finetune.py"), "--epochs", "1", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.load(open(out / "results.json"))
    assert (res["train_samples"], res["val_samples"]) == (244, 153)
    assert res["model"] == "tf_efficientnet_lite0"
    assert res["best_val_accuracy"] >= 0.85, res  # chance: 0.54
    assert not (tmp_path / "data").exists()  # nothing was downloaded
    assert "logging offline" in proc.stdout  # W&B, with no account, stays local


@pytest.mark.slow
@pytest.mark.parametrize("source", ["torch cache", "--weights"])
def test_a_new_users_convnext_tiny_trains(source, image_folder, tmp_path, offline_env):
    """`--model convnext_tiny` (torchvision's, as torchvision has that name) with its weights
    in torch's local cache, and timm's `convnext_tiny.fb_in1k` from a --weights file (random
    tensors here: no network, and only the plumbing is under test)."""
    from safetensors.torch import save_file

    env = dict(offline_env, TORCH_HOME=str(tmp_path / "torch"))
    if source == "torch cache":
        import torchvision

        cache = tmp_path / "torch" / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        torch.save(torchvision.models.convnext_tiny().state_dict(),
                   cache / os.path.basename(torchvision.models.ConvNeXt_Tiny_Weights.DEFAULT.url))
        model = ["--model", "convnext_tiny"]
    else:
        import timm

        save_file(timm.create_model("convnext_tiny").state_dict(), tmp_path / "w.safetensors")
        model = ["--model", "convnext_tiny.fb_in1k", "--weights", tmp_path / "w.safetensors"]
    out = tmp_path / "run"
    launch("train_finetune.py", ["--data-dir", image_folder, *model, "--epochs", "1",
                                 "--probe-epochs", "1", "--batch-size", "6",
                                 "--num-workers", "0", "--output-dir", out,
                                 "--report-to", "none"], env)
    res = json.load(open(out / "results.json"))
    assert res["model"] == model[1] and res["optimizer_steps"] == 3
    meta = json.load(open(out / "best" / "model.json"))
    # the model's 224 px at the 40-px images' side (--image-size auto): 128, the resize in
    # the same ratio (torchvision's 236, timm's 256)
    assert meta["preprocessing"]["input_size"] == res["image_size"] == 128
    resize = 236 if source == "torch cache" else 256
    assert meta["preprocessing"]["resize"] == 128 * resize // 224
