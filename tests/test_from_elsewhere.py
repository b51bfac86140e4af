"""A run folder, export or checkpoint someone else made (or a data folder with odd entries)
can be refused, never obeyed: nothing is written through a link, nothing blocks on a FIFO or
reads without end, nothing in model.json downloads or allocates without bound."""

import json
import os
import shutil

import pytest

from conftest import launch, make_image_folder, run_script
from test_bad_input import assert_one_line_error

TINY = ["--model", "timm:test_resnet", "--no-pretrained", "--batch-size", "4",
        "--num-workers", "0", "--report-to", "none"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, offline_env):
    root = tmp_path_factory.mktemp("elsewhere")
    data = make_image_folder(root / "data")
    out = root / "run"
    launch("train_extractor.py", ["--data-dir", data, *TINY, "--epochs", "2",
                                  "--checkpointing-steps", "epoch", "--output-dir", out],
           offline_env)
    return data, out


def _copy(run, tmp_path):
    data, out = run
    mine = tmp_path / "run"
    shutil.copytree(out, mine, symlinks=True)
    return data, mine


@pytest.mark.parametrize("fmt, name", [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_export_never_writes_through_a_link_in_the_run_folder(run, tmp_path, offline_env,
                                                              fmt, name):
    data, mine = _copy(run, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, mine / "best" / name)
    proc = run_script("export.py", [mine, "--format", fmt], offline_env)
    assert_one_line_error(proc, "is a symbolic link", "refusing to write through it")
    assert victim.read_text() == "keep me"
    os.unlink(mine / "best" / name)  # the link gone: written, as a new file
    proc = run_script("export.py", [mine, "--format", fmt], offline_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (mine / "best" / name).is_file() and not (mine / "best" / name).is_symlink()
    assert not [f for f in os.listdir(mine / "best") if f.startswith(".tmp-")]


def test_export_refuses_a_best_folder_that_is_a_link(run, tmp_path, offline_env):
    data, mine = _copy(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(mine / "best", elsewhere)
    os.symlink(elsewhere, mine / "best")
    proc = run_script("export.py", [mine, "--format", "onnx"], offline_env)
    assert_one_line_error(proc, "is a symbolic link")
    assert not (elsewhere / "model.onnx").exists()
