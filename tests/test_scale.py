"""At scale: streamed datasets, cached image-check verdicts, several machines (two launches on
one host, gloo over loopback)."""

import json
import os
import socket
import subprocess
import sys

import datasets
import pytest

from conftest import CONFIGS, REPO, launch, make_image_folder

TINY = ["--model", "timm:test_resnet", "--no-pretrained", "--batch-size", "4",
        "--num-workers", "0", "--report-to", "none"]


@pytest.fixture(scope="module")
def parquet_set(tmp_path_factory):
    """A parquet dataset with the image bytes embedded (as Hub datasets store them) and the
    same images as an image folder."""
    root = tmp_path_factory.mktemp("pq")
    folder = make_image_folder(root / "imgs", counts={"train": 10, "val": 5})
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, split))
                       for f in fs)
        ds = datasets.Dataset.from_dict(
            {"image": files, "label": [os.path.basename(os.path.dirname(f)) for f in files]})
        ds.cast_column("image", datasets.Image()).to_parquet(
            str(root / "pq" / f"{name}-00000.parquet"))
    return str(root / "pq"), folder


@pytest.fixture(scope="module")
def parquet_files_set(tmp_path_factory):
    """The same kind of set, each split in 4 parquet files (as large Hub datasets are), 17 val
    images (not a multiple of processes x workers)."""
    root = tmp_path_factory.mktemp("pq4")
    folder = make_image_folder(root / "imgs", counts={"train": 8, "val": 6})
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, split))
                       for f in fs)[:17 if split == "val" else None]
        ds = datasets.Dataset.from_dict(
            {"image": files, "label": [os.path.basename(os.path.dirname(f)) for f in files]})
        ds = ds.cast_column("image", datasets.Image())
        for k in range(4):
            ds.shard(4, k, contiguous=True).to_parquet(
                str(root / "pq" / f"{name}-{k:05d}-of-00004.parquet"))
    return str(root / "pq")


def test_streamed_val_rows_go_to_one_reader_each_with_an_index_that_does_not_depend_on_readers(
        parquet_files_set):
    from common.streaming import val_rows

    stream = datasets.load_dataset(parquet_files_set, streaming=True)["validation"]
    stream = stream.cast_column("image", datasets.Image(decode=False))
    assert stream.num_shards == 4
    alone = {r["index"]: r["image"]["bytes"] for r in val_rows(stream, 0, 1)}
    assert len(alone) == 17
    for readers in (2, 3, 4, 6):  # whole files each, and every n-th row (more readers)
        parts = [[(r["index"], r["image"]["bytes"]) for r in val_rows(stream, k, readers)]
                 for k in range(readers)]
        rows = [row for part in parts for row in part]
        assert len(rows) == 17 and dict(rows) == alone, readers


def test_streaming_4_files_on_2_processes_and_2_workers_counts_every_val_image_once(
        parquet_files_set, tmp_path, offline_env):
    base = ["--dataset", parquet_files_set, *TINY, "--epochs", "0", "--probe-epochs", "0"]
    launch("train_finetune.py", [*base, "--output-dir", tmp_path / "mem"], offline_env)
    launch("train_finetune.py", [*base, "--streaming", "--num-workers", "2", "--output-dir",
                                 tmp_path / "stream"], offline_env, nproc=2)
    mem, stream = results(tmp_path / "mem"), results(tmp_path / "stream")
    assert mem["val_samples"] == stream["val_samples"] == 17
    assert sum(map(sum, stream["best_confusion_matrix"])) == 17
    assert stream["best_confusion_matrix"] == mem["best_confusion_matrix"]
    assert stream["best_val_loss"] == pytest.approx(mem["best_val_loss"], rel=1e-5)


def test_a_val_stream_evaluated_short_is_an_error_not_a_number(parquet_files_set):
    """The split's size (a dataset card's, or the label pass) against what was evaluated."""
    import torch
    from accelerate import Accelerator

    from common.engine import evaluate
    from common.errors import RunFailure
    from common.metrics import load_metrics
    from common.streaming import StreamDataset, StreamLoader, StreamSplit

    stream = datasets.load_dataset(parquet_files_set, streaming=True)["validation"]
    stream = stream.cast_column("image", datasets.Image(decode=False))
    names = ["cat", "dog", "fox"]
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(3, 3))
    tf = lambda img: torch.zeros(3, 8, 8)  # noqa: E731
    for size, ok in ((17, True), (18, False)):
        split = StreamSplit(stream, size, {n: i for i, n in enumerate(names)}, None,
                            name="validation", num_classes=3)
        loader = StreamLoader(StreamDataset(split, tf, 0, 1), 4, 0, accelerator.device)
        if ok:
            assert evaluate(model, loader, load_metrics(accelerator), names,
                            accelerator=accelerator)["samples"] == 17
        else:
            with pytest.raises(RunFailure, match="17 of its 18 images"):
                evaluate(model, loader, load_metrics(accelerator), names,
                         accelerator=accelerator)


def results(out):
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def test_streaming_on_2_processes_counts_val_once_like_the_in_memory_dataset(
        parquet_set, tmp_path, offline_env):
    path, _ = parquet_set
    base = ["--dataset", path, *TINY, "--epochs", "0", "--probe-epochs", "0"]
    launch("train_finetune.py", [*base, "--output-dir", tmp_path / "mem"], offline_env)
    proc = launch("train_finetune.py", [*base, "--streaming", "--output-dir",
                                        tmp_path / "stream"], offline_env, nproc=2)
    assert "--streaming: 30 train / 15 'validation' images" in proc.stdout
    mem, stream = results(tmp_path / "mem"), results(tmp_path / "stream")
    assert mem["val_samples"] == stream["val_samples"] == 15
    assert stream["num_processes"] == 2
    assert stream["best_val_accuracy"] == mem["best_val_accuracy"]
    assert stream["best_val_loss"] == pytest.approx(mem["best_val_loss"], rel=1e-5)
    assert stream["best_confusion_matrix"] == mem["best_confusion_matrix"]


def test_streaming_trains_and_resumes_mid_epoch_exactly(parquet_set, tmp_path, offline_env):
    path, _ = parquet_set
    args = ["--dataset", path, "--streaming", *TINY, "--epochs", "2", "--optimizer", "sgd",
            "--lr", "0.1", "--checkpointing-steps", "3", "--checkpoints-total-limit", "0"]
    full = tmp_path / "full"
    launch("train_finetune.py", [*args, "--output-dir", full], offline_env)
    a = results(full)
    # 30 images / batch 4: 7 steps per epoch (the 2 left over change with the shuffle)
    assert a["steps_per_epoch"] == 7 and a["optimizer_steps"] == 14
    assert a["best_val_accuracy"] >= 10 / 15, a  # chance: 5 of 15
    resumed = tmp_path / "resumed"
    launch("train_finetune.py", [*args, "--output-dir", resumed, "--resume-from-checkpoint",
                                 full / "checkpoints" / "step-00000009"], offline_env)
    b = results(resumed)
    assert b["final_val_accuracy"] == a["final_val_accuracy"]
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-5)


def test_image_check_verdicts_are_cached_and_a_changed_file_is_checked_again(
        tmp_path, monkeypatch):
    from accelerate import Accelerator

    from common import imagecheck
    from common.data import load_image_folder
    from conftest import COLOURS, write_image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", counts={"train": 4, "val": 1})
    (tmp_path / "d" / "train" / "cat" / "bad.jpg").write_bytes(b"not a jpeg")
    train, _, _ = load_image_folder(root, 0.2, 0)
    decoded = []
    real = imagecheck._check_image
    monkeypatch.setattr(imagecheck, "_check_image", lambda src: decoded.append(1) or real(src))
    accelerator = Accelerator(cpu=True)
    first = imagecheck.find_unreadable(train, "train", accelerator, workers=0)
    assert len(decoded) == 13 and [b[1].endswith("bad.jpg") for b in first] == [True]
    again = imagecheck.find_unreadable(train, "train", accelerator, workers=0)
    assert again == first and len(decoded) == 13  # nothing decoded the second time
    write_image(str(tmp_path / "d" / "train" / "cat" / "bad.jpg"), COLOURS["cat"])  # mended
    train, _, _ = load_image_folder(root, 0.2, 0)
    assert imagecheck.find_unreadable(train, "train", accelerator, workers=0) == []
    assert len(decoded) == 26


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_machines(script, args, env, timeout=600):
    """The same command on 'machine' 0 and 1 (two launches, one process each), as on a
    cluster: --num_machines 2 --machine_rank R --main_process_ip <machine 0>."""
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    port = str(_free_port())
    procs = [subprocess.Popen(
        [accelerate, "launch", "--config_file", os.path.join(CONFIGS, "cpu_2proc.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_finetune.py", "train_extractor.py"])
def test_two_machines_give_the_metrics_of_one_process_and_resume(script, tmp_path,
                                                                offline_env):
    data = make_image_folder(tmp_path / "data", counts={"train": 4, "val": 5})  # 15 val: odd
    base = ["--data-dir", data, *TINY, "--feature-cache-dir", tmp_path / "cache"]
    launch(script, [*base, "--epochs", "0", "--output-dir", tmp_path / "one"], offline_env)
    launch_two_machines(script, [*base, "--epochs", "0", "--output-dir", tmp_path / "two"],
                        offline_env)
    one, two = results(tmp_path / "one"), results(tmp_path / "two")
    assert two["num_processes"] == 2 and one["val_samples"] == two["val_samples"] == 15
    assert one["best_val_accuracy"] == two["best_val_accuracy"]
    assert one["best_val_loss"] == pytest.approx(two["best_val_loss"], rel=1e-5)
    # train on both machines, then resume from the first epoch's checkpoint on both
    train = [*base, "--epochs", "2", "--checkpointing-steps", "epoch",
             "--checkpoints-total-limit", "0"]
    launch_two_machines(script, [*train, "--output-dir", tmp_path / "full"], offline_env)
    first = sorted((tmp_path / "full" / "checkpoints").glob("step-*"))[0]
    launch_two_machines(script, [*train, "--output-dir", tmp_path / "resumed",
                                 "--resume-from-checkpoint", first], offline_env)
    a, b = results(tmp_path / "full"), results(tmp_path / "resumed")
    assert a["final_val_accuracy"] == b["final_val_accuracy"]
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-5)


_TRIM_PROBE = r"""
import ctypes, torch
from common.memory import trim_host_memory
def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
big = torch.ones(16 << 20, dtype=torch.uint8)
del big  # freeing a 16 MB mmapped block raises glibc's dynamic mmap threshold to 16 MB
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(300)]  # 300 MB on the heap
keep = blocks[-1]  # pins the heap's top: freeing the rest cannot shrink it by itself
del blocks
before = rss_mb()
trim_host_memory(torch.device("cpu"))
print(before, rss_mb())
"""


_GUARD_PROBE = r"""
import resource, sys, torch
from common.memory import HeapGuard, keep_host_memory
assert keep_host_memory(torch.device("cpu"))  # as the scripts run on CPU
guard, held, faults = HeapGuard(torch.device("cpu")), [], []  # the 128 MB margin
for batch in range(12):
    guard()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    acts = [torch.ones(8 << 20, dtype=torch.uint8) for _ in range(25)]  # 200 MB, freed
    del acts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    if sys.argv[1] == "creep" and batch >= 3:
        held.append(torch.ones(96 << 20, dtype=torch.uint8))  # +96 MB a batch
print(guard.trims, max(faults[3:7]), *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_heap_guard_keeps_pages_while_steady_and_hands_them_back_when_memory_creeps():
    # steady batches: no hand-back, so later batches reuse the heap without page faults (what
    # makes CPU evaluation ~2x faster than a trim before every batch)
    def probe(kind):
        proc = subprocess.run([sys.executable, "-c", _GUARD_PROBE, kind], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return list(map(int, proc.stdout.split()))

    trims, faults, *each = probe("steady")
    # 200 MB is ~51k pages to fault in; each: the faults of every batch
    assert trims == 0 and faults < 2000, (trims, faults, each)
    trims, _, *each = probe("creep")  # 96 MB more each batch from batch 3: past the margin
    assert trims >= 2, (trims, each)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux")
def test_trim_host_memory_returns_freed_heap_pages_to_the_os():
    # what bounds the resident memory of evaluation and extraction over many CPU batches
    proc = subprocess.run([sys.executable, "-c", _TRIM_PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split())
    assert before - after > 200, (before, after)
