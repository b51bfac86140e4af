"""The training loop in-process, with the real Accelerator: skipped fp16 steps, host syncs per
epoch, DDP built again at the unfreeze, per-rank seeds."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from common.checkpoint import TrainState
from common.config import FinetuneConfig
from common.ema import ModelEma
from common.engine import (StopSignal, Sums, last_batch_remainder, make_loss, reduce_sums,
                           train_epoch)
from common.optim import build_optimizer, build_scheduler, lr_factor

from conftest import REPO, two_processes


class TinyData(torch.utils.data.Dataset):
    def __init__(self, n, scale=1.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g) * scale
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": int(self.y[i]), "index": i}


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.body(x))


def _epoch(accelerator, n, batch_size=4, scale=1.0, log_every=1000, on_step=None, loss=None,
           ema_decay=None):
    """Prepare a tiny model/optimiser/loader and train one epoch as the trainer does (the EMA
    updated after each optimiser step); returns what it needs."""
    torch.manual_seed(0)
    model = TinyNet()
    cfg = FinetuneConfig(optimizer="sgd", lr=0.1, epochs=2, scheduler="cosine",
                         log_every=log_every)
    optimizer = build_optimizer(cfg, model, ("head",))
    loader = torch.utils.data.DataLoader(TinyData(n, scale), batch_size=batch_size,
                                         pin_memory=torch.cuda.is_available())
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    state = TrainState()
    seen = []
    ema = ModelEma(accelerator.unwrap_model(model), ema_decay) if ema_decay else None
    epoch_sums, window = Sums(accelerator.device), Sums(accelerator.device)
    for _ in train_epoch(model, loader, optimizer, scheduler, state, loss_fn=loss or make_loss(),
                         sums=(epoch_sums, window), accelerator=accelerator,
                         remainder=last_batch_remainder(loader, accelerator.num_processes)):
        seen.append(accelerator.optimizer_step_was_skipped)
        if ema is not None:  # as the trainer does after each optimiser step
            ema.update(accelerator.unwrap_model(model))
        if on_step:
            on_step(window, epoch_sums)
    totals, _ = reduce_sums(accelerator, epoch_sums, StopSignal())
    return dict(cfg=cfg, scheduler=scheduler, optimizer=optimizer, state=state,
                totals=totals, skipped=seen, steps=len(loader))


def test_schedule_does_not_step_when_the_fp16_scaler_skips_the_optimiser_step():
    accelerator = Accelerator(cpu=True)
    # a real GradScaler whose first scales overflow fp32 gradients: those steps are skipped
    # (and the scale halved each time) exactly as fp16 training on a GPU skips them
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126)
    out = _epoch(accelerator, n=40, scale=100.0)
    skipped = sum(out["skipped"])
    assert 0 < skipped < out["steps"], out["skipped"]
    assert out["state"].step == out["steps"]  # optimiser steps attempted
    assert out["scheduler"].last_epoch == out["steps"] - skipped  # the schedule only moved
    taken = out["steps"] - skipped  # on the steps the optimiser actually took
    expected = 0.1 * lr_factor(out["cfg"], taken, out["steps"])
    assert out["optimizer"].param_groups[0]["lr"] == pytest.approx(expected)
    assert math.isfinite(out["totals"].loss) and out["totals"].samples == 40


class SyncCounter:
    """Counts the calls that copy a tensor to the host or talk to other processes, and the
    ones that would copy host data to a GPU (a tensor built from Python numbers, a `.to()`
    or `.cuda()` that names a device), by wrapping (not replacing) them. On a CPU-only
    machine these are no copies at all, but the same calls are on a GPU: counting the calls
    finds a per-step copy without a GPU. The batches the prepared loader collates on the host
    and moves to the device (non-blocking on a GPU) are the one expected per-step move, and
    are not counted."""

    NAMES = [(torch.Tensor, "item"), (torch.Tensor, "tolist"), (torch.Tensor, "cpu"),
             (torch.Tensor, "numpy"), (torch.Tensor, "__bool__"), (torch.Tensor, "__float__")]
    BUILDS = [(torch, "tensor"), (torch, "as_tensor")]
    MOVES = [(torch.Tensor, "to"), (torch.Tensor, "cuda")]

    def __init__(self, monkeypatch, accelerator):
        self.count, self.copies, self.where = 0, 0, []  # syncs; host-to-device copies
        for owner, name in self.NAMES:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))
        for owner, name in self.BUILDS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name,
                                                        copy=True))
        for owner, name in self.MOVES:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name, True,
                                                        copy=True))
        for name in ("reduce", "gather", "gather_for_metrics"):
            monkeypatch.setattr(accelerator, name, self._wrap(getattr(accelerator, name), name))

    def _wrap(self, fn, name, move=False, copy=False):
        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if move and not (kwargs.get("device") is not None or name == "cuda" or any(
                    isinstance(a, (torch.device, str)) for a in args[1:])):
                return fn(*args, **kwargs)  # a dtype or memory-format change on the device
            if move and caller.endswith(os.path.join("accelerate", "utils", "operations.py")):
                return fn(*args, **kwargs)  # the loader's batch, moved once per step
            if os.path.join("torch", "utils", "data") in caller:
                return fn(*args, **kwargs)  # collating host tensors (in workers on a GPU)
            if copy:
                self.copies += 1
            else:
                self.count += 1
            self.where.append(f"{name} from {os.path.basename(caller)}")
            return fn(*args, **kwargs)
        return counted


def test_an_epoch_syncs_with_the_host_a_fixed_number_of_times_not_once_per_step(monkeypatch):
    counts = {}
    for n in (16, 96):  # 4 and 24 optimiser steps, no log point inside the epoch
        accelerator = Accelerator(cpu=True)
        with monkeypatch.context() as m:
            counter = SyncCounter(m, accelerator)
            out = _epoch(accelerator, n=n)
        counts[n] = counter.count
        assert out["totals"].samples == n
    assert counts[16] == counts[96] and counts[16] <= 3, counts
    # a log point every 4 steps adds one reduce and one copy each: 6 log points in 24 steps
    accelerator = Accelerator(cpu=True)

    steps = []

    def log_point(window, epoch_sums):
        steps.append(1)
        if len(steps) % 4 == 0:
            reduce_sums(accelerator, window, StopSignal())

    with monkeypatch.context() as m:
        counter = SyncCounter(m, accelerator)
        _epoch(accelerator, n=96, on_step=log_point)
    assert counter.count == counts[96] + 6 * 2


def test_class_weights_and_the_ema_copy_nothing_to_the_device_per_step(monkeypatch):
    """--class-weights auto and --model-ema on: still no host sync and no host-to-device
    copy inside the step (the weights were once rebuilt on the device every step, and
    torch's AveragedModel copied its CPU update count to the GPU at every update)."""
    counts, where = {}, {}
    for n in (16, 96):  # 4 and 24 optimiser steps
        accelerator = Accelerator(cpu=True)
        with monkeypatch.context() as m:
            counter = SyncCounter(m, accelerator)
            out = _epoch(accelerator, n=n, loss=make_loss(0.0, [0.7, 1.3]), ema_decay=0.99)
        counts[n], where[n] = (counter.count, counter.copies), counter.where
        assert out["totals"].samples == n
    assert counts[16] == counts[96], where[96]


def _ddp_rewrap_worker():
    import torch.distributed as dist

    from common.models import freeze_backbone
    from accelerate.state import AcceleratorState

    from common.phase import rewrap_ddp
    from common.accelerator import seed_for_training

    # forked from a pytest process whose earlier tests built a one-process Accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = TinyNet()
    start = model.body[0].weight.detach().clone().flatten()
    freeze_backbone(model, ("head",), True)  # --freeze-epochs: DDP sees only the head
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert not model.find_unused_parameters

    def step():
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank + 1))  # per rank
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    step()
    freeze_backbone(accelerator.unwrap_model(model), ("head",), False)
    model = rewrap_ddp(accelerator, model)
    assert not model.find_unused_parameters
    step()  # the backbone now learns, from gradients averaged over both ranks
    w = accelerator.unwrap_model(model).body[0].weight.detach().flatten()
    everyone = [torch.zeros_like(w) for _ in range(2)]
    dist.all_gather(everyone, w)
    assert torch.equal(everyone[0], everyone[1]), "ranks diverged after the unfreeze"
    assert not torch.equal(w, start)
    seed_for_training(accelerator, 42)
    draws = [torch.zeros(3) for _ in range(2)]
    dist.all_gather(draws, torch.rand(3))
    assert not torch.equal(draws[0], draws[1]), "dropout masks would be identical on all ranks"


def test_unfreezing_rebuilds_ddp_so_backbone_gradients_are_averaged_and_seeds_differ():
    two_processes(_ddp_rewrap_worker)


FAULTS_OF_BIG_TENSORS = """
import resource, sys, torch
import accelerate  # as in the scripts, which call keep_host_memory with their libraries
# loaded (without them, glibc here still faulted in every other 64 MB block)
from common.memory import keep_host_memory
kept = keep_host_memory(torch.device("cpu")) if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):  # the heap grows to its size once
    torch.ones(16 * 2 ** 20)
f0 = faults()
for _ in range(10):
    torch.ones(16 * 2 ** 20)  # 64 MB: above glibc's largest mmap threshold (32 MB)
print(kept, faults() - f0)
"""


@pytest.mark.parametrize("tunables", [None, "glibc.malloc.hugetlb=0"])
def test_cpu_runs_reuse_freed_memory_instead_of_faulting_it_in_again(tunables, offline_env):
    """setup_run's keep_host_memory on CPU: each step's activations (tens of MB each) come
    back from the heap instead of fresh, zeroed pages (~800k page faults per step at batch
    32, half the step); a user who set a glibc.malloc tunable keeps glibc as they set it."""
    env = {k: v for k, v in offline_env.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables

    def run(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_OF_BIG_TENSORS, mode], cwd=REPO,
                             env=env, capture_output=True, text=True, check=True).stdout
        kept, faults = out.split()
        return kept, int(faults)

    plain, (kept, faulted) = run("plain"), run("keep")
    if kept == "False" and not tunables:
        pytest.skip("not glibc: the allocator is left alone")
    assert plain[1] > 10 * 16 * 2 ** 20 // 4096 // 2  # glibc's default: fresh pages each time
    if tunables:
        assert kept == "False" and faulted > plain[1] // 2
    else:
        assert kept == "True" and faulted < plain[1] // 5, (faulted, plain)


def _ema_sync_worker():
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEma(accelerator.unwrap_model(model), 0.9)
    for _ in range(3):  # each rank's own batches: its own BatchNorm statistics
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(rank + 1)) * (rank + 1)
        accelerator.backward(model(x).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        ema.update(accelerator.unwrap_model(model))

    def everyone(t):
        out = [torch.zeros_like(t) for _ in range(2)]
        dist.all_gather(out, t.contiguous())
        return out

    mean = ema.module[1].running_mean
    assert not torch.equal(*everyone(mean)), "the ranks' statistics were already equal"
    ema.sync(accelerator)
    for t in ema.state_dict().values():
        assert torch.equal(*everyone(t.float()))
    assert ema.updates == 3


def test_the_ema_is_rank_0s_on_every_rank_before_it_is_evaluated_or_saved():
    two_processes(_ema_sync_worker)


LAUNCHER_CHOICE = """
import os
from accelerate.utils import parse_flag_from_env
visible = os.environ.get("CUDA_VISIBLE_DEVICES")
print("rank", os.environ.get("RANK", "0"), "told", parse_flag_from_env("ACCELERATE_USE_CPU"),
      "hidden", visible is not None and (visible == "" or visible.startswith("-1")))
"""


@pytest.mark.launch
@pytest.mark.parametrize("config", ["cpu.yaml", "cpu_2proc.yaml"])
def test_the_cpu_launcher_configs_keep_every_rank_on_the_cpu_even_beside_a_gpu(
        config, tmp_path, offline_env):
    """Each rank of a CPU config must build a CPU Accelerator whether or not the machine has
    a GPU: either the launcher says so (ACCELERATE_USE_CPU) or the config hides the GPUs
    (CUDA_VISIBLE_DEVICES). Read from the workers' own environment, not from whether CUDA is
    there, so it fails here as on a GPU machine when a config would let a rank take a GPU."""
    script = tmp_path / "choice.py"
    script.write_text(LAUNCHER_CHOICE)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    env = dict(offline_env, PYTHONPATH=REPO)
    env.pop("ACCELERATE_USE_CPU", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run([accelerate, "launch", "--config_file",
                          os.path.join(REPO, "accelerate_configs", config), str(script)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("rank"))
    nproc = 2 if config == "cpu_2proc.yaml" else 1
    assert len(lines) == nproc, out.stdout + out.stderr
    for line in lines:  # told to use the CPU (launcher_chose_cpu reads it), or no GPU seen
        assert "told True" in line or "hidden True" in line, line


def test_the_launchers_cpu_choice_wins_over_an_available_gpu(monkeypatch):
    from common.hardware import launcher_chose_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert not launcher_chose_cpu()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # as `accelerate launch --cpu` sets it
    assert launcher_chose_cpu()


def test_bf16_counts_as_native_on_ampere_and_newer_only(monkeypatch):
    """A T4 or V100 (compute capability 7.x) emulates bf16, although
    torch.cuda.is_bf16_supported() says yes: --extract-precision auto stays fp32 there."""
    from common.config import ExtractorConfig
    from common.features import extract_precision
    from common.hardware import gpu_has_native_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = ExtractorConfig()
    for capability, want in (((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"),
                             ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        assert gpu_has_native_bf16() == (want == "bf16")
        assert extract_precision(cfg, torch.device("cuda")) == want, capability


def _padding_worker():
    from accelerate.data_loader import DataLoaderShard
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    # what a loader resumed with skip_first_batches reports on some Accelerate versions
    # (its SkipBatchSampler hides the batch size): no remainder known
    begin = DataLoaderShard.begin

    def begin_without_remainder(self):
        begin(self)
        self.remainder = -1

    DataLoaderShard.begin = begin_without_remainder
    try:
        out = _epoch(accelerator, n=21)  # 2 x 4 per step: the last global batch has 5 real
    finally:
        DataLoaderShard.begin = begin
    assert out["totals"].samples == 21, out["totals"]


def test_padding_is_left_out_of_train_sums_even_when_the_loader_knows_no_remainder():
    two_processes(_padding_worker)


def test_a_resumed_fp16_schedule_continues_where_it_stood_not_at_the_step_count():
    """The fp16 GradScaler skips steps and the schedule waits on them: a resumed run must
    put its schedule where it stood (the train state keeps it), not at the optimiser-step
    count, which is ahead by the skipped steps."""
    from common.optim import position_scheduler

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126)  # forced infs
    out = _epoch(accelerator, n=40, scale=100.0)
    state = out["state"]
    skipped = sum(out["skipped"])
    assert skipped > 0 and state.step == out["steps"]
    assert state.schedule_steps == out["scheduler"].last_epoch == out["steps"] - skipped
    # what a resume does with a saved TrainState: a fresh schedule, positioned
    restored = TrainState.from_dict(json.loads(json.dumps(dataclasses.asdict(state))))
    torch.manual_seed(0)
    fresh = TinyNet()
    optimizer = build_optimizer(out["cfg"], fresh, ("head",))
    scheduler = build_scheduler(out["cfg"], optimizer, out["steps"])
    position_scheduler(scheduler, restored.schedule_position())
    assert scheduler.last_epoch == out["scheduler"].last_epoch
    assert [g["lr"] for g in optimizer.param_groups] == \
        pytest.approx([g["lr"] for g in out["optimizer"].param_groups])
    # a checkpoint written before the position was kept: the step count, as before
    legacy = TrainState.from_dict({k: v for k, v in dataclasses.asdict(state).items()
                                   if k != "schedule_steps"})
    assert legacy.schedule_position() == state.step
