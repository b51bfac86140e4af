"""Shared fixtures: the ../shared folder, tiny generated image folders, and launching the
real entry scripts under `accelerate launch` the way a user does, fully offline."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n auto` (setup.cfg): one pytest worker per core, so each computes on one thread, as
    # the scripts they launch do (OMP_NUM_THREADS=1 below); more threads than cores would make
    # the workers' OpenMP threads spin against each other
    torch.set_num_threads(1)
CONFIGS = os.path.join(REPO, "accelerate_configs")


@pytest.fixture(scope="session")
def shared_dir():
    """../shared (or $TL_SHARED_DIR): the real ants/bees data and the lite0 weights."""
    path = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
    data = os.path.join(path, "data", "hymenoptera_data")
    weights = os.path.join(path, "weights", "tf_efficientnet_lite0.in1k.safetensors")
    if not (os.path.isdir(data) and os.path.isfile(weights)):
        pytest.skip(f"shared data/weights not found under {path} (set TL_SHARED_DIR)")
    return dict(root=path, data=data, weights=weights)


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory):
    """Environment for subprocesses: no network, W&B offline, HF caches in a temp dir."""
    home = tmp_path_factory.mktemp("hf_home")
    env = dict(os.environ)
    env.update(HF_HOME=str(home), XDG_CACHE_HOME=str(home / "xdg"),  # feature cache too
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_MODE="offline", WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    os.environ.setdefault("HF_HOME", str(home))  # in-process evaluate/datasets use it too
    return env


# Three colour-coded classes, so a tiny model can actually learn them.
COLOURS = {"cat": (200, 60, 60), "dog": (60, 200, 60), "fox": (60, 60, 200)}


def write_image(path, colour, size=(48, 40), seed=0, mode="RGB", fmt=None):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)),
                  0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_image_folder(root, counts=None, classes=("cat", "dog", "fox"), splits=("train", "val")):
    """root/<split>/<class>/<i>.jpg with counts[split] images per class (default 6 / 3)."""
    counts = counts or {"train": 6, "val": 3}
    seed = 0
    for split in splits:
        for cls in classes:
            for i in range(counts[split]):
                seed += 1
                write_image(os.path.join(root, split, cls, f"{i}.jpg"), COLOURS[cls], seed=seed)
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


def launch(script, args, env, nproc=1, timeout=600, check=True):
    """`accelerate launch --config_file accelerate_configs/cpu[_2proc].yaml script args`."""
    config = os.path.join(CONFIGS, "cpu.yaml" if nproc == 1 else "cpu_2proc.yaml")
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--config_file", config,
           os.path.join(REPO, script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def run_script(script, args, env, cwd=REPO, timeout=300):
    """`python script args` (no launcher), for argument and error checks."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A 'pretrained' test_resnet file whose BatchNorm statistics are far from the defaults
    (mean 0, var 1), so any update of them during training would show."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=1000)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn_like(buf) * 0.5)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand_like(buf) + 0.5)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)
