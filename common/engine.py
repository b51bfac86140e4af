"""The one training step, the epoch around it, and the evaluation: the batch-level loop of
every run (the fine-tune, the extractor, the linear probe, the LR range test).

One batch: DataLoader (common/data.py or the cached features of common/features.py) ->
`model` under Accelerate's autocast -> per-sample loss (`make_loss`) -> `accelerator.backward`
inside `accelerator.accumulate` -> optimiser step -> our LR schedule step (common/optim.py),
unless the fp16 GradScaler skipped the step -> running sums of loss / correct / samples, kept
on the device -> `train_epoch` yields, and the caller (common/trainer.py) logs, checkpoints
or stops.

No host sync per step: the sums are all-reduced (with the stop-signal flag) and copied to
the host only at log points (every `--log-every` optimiser steps), before a checkpoint, and
at the end of the epoch; that is also where a non-finite loss is caught. On a GPU a sync per
step stalls the queue of kernels; `tests/test_loop.py` counts them.

Exact counts on N processes: Accelerate pads the last batch of an epoch so that every process
gets a full one; the padding (dataset samples seen twice) is trained on but left out of the
sums, as `gather_for_metrics` leaves it out of validation metrics.

Global batch = batch-size x processes x gradient-accumulation-steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
from typing import Callable, Iterable, Iterator, Optional, TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from tqdm.auto import tqdm

from common.errors import RunFailure
from common.metrics import compute_metrics
from common.memory import HeapGuard


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.checkpoint import TrainState
    from torch.optim.lr_scheduler import LRScheduler


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop reduces it across ranks at its next sync point
    and all ranks then save a checkpoint and exit together. Clusters send SIGTERM before
    SIGKILL."""

    def __init__(self):
        self.signum = 0
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers that were there before (a second run in one process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


def make_loss(label_smoothing: float = 0.0, class_weights: Optional[list] = None) -> Callable:
    """Per-sample cross-entropy of the training objective (the val loss stays plain).
    `labels` are class indices, or class probabilities (MixUp/CutMix); `class_weights`
    (--class-weights auto) weigh each sample by its class."""
    weights = {}

    def loss(logits, labels):
        w = None
        if class_weights is not None:
            key = (logits.device, logits.dtype)
            if key not in weights:  # once: a copy to the GPU per step would be a host sync
                weights[key] = torch.as_tensor(class_weights, dtype=logits.dtype,
                                               device=logits.device)
            w = weights[key]
        return F.cross_entropy(logits, labels, weight=w, reduction="none",
                               label_smoothing=label_smoothing)

    return loss


class BatchMix:
    """--mixup / --cutmix: torchvision's MixUp or CutMix (one of them, chosen per batch when
    both are on) on a training batch, under an RNG seeded by (seed, epoch, batch, process):
    the same mix after a resume. Features (2-D batches) take MixUp only."""

    def __init__(self, mixup, cutmix, num_classes, seed):
        ops = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
              ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        self.mixup_only = v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup else None
        self.seed = seed

    def __call__(self, x, y, key):
        with torch.random.fork_rng(devices=[]):  # MixUp/CutMix draw on the CPU
            seed = np.random.SeedSequence([self.seed, *key, 2]).generate_state(1)[0]
            torch.manual_seed(int(seed))
            if x.ndim == 4:
                return self.op(x, y)
            mixed, target = self.mixup_only(x[:, :, None, None], y)
            return mixed[:, :, 0, 0], target


def model_inputs(batch: dict, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["pixel_values"]
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["labels"]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict,
               loss_fn: Callable, *, accelerator: Optional[Accelerator] = None,
               mix: Optional[BatchMix] = None, key: tuple = (0, 0, 0),
               channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The one training step: forward, per-sample loss, backward and (once the accumulation
    window is full) optimiser step. `key` (epoch, batch, process) seeds --mixup/--cutmix.

    `accelerator`: the one that prepared `model` and `optimizer` (its accumulation window,
    DDP's gradient sync, fp16 loss scaling); None for a module trained outside it, alike on
    every process (the linear probe's heads): every batch is then a step of its own.
    Returns (per-sample losses, logits), detached, still on the device."""
    x, y = batch["pixel_values"], batch["labels"]
    target = y
    if mix is not None:
        x, target = mix(x, y, key)
    x, _ = model_inputs({"pixel_values": x, "labels": y}, channels_last)
    with accelerator.accumulate(model) if accelerator else contextlib.nullcontext():
        logits = model(x)
        per_sample = loss_fn(logits.float(), target)
        if accelerator:
            accelerator.backward(per_sample.mean())
        else:
            per_sample.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return per_sample.detach(), logits.detach()


def train_epoch(model: torch.nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                scheduler: Optional[LRScheduler], state: TrainState, *, loss_fn: Callable,
                sums: tuple = (), accelerator: Optional[Accelerator] = None, remainder: int = 0,
                mix: Optional[BatchMix] = None, channels_last: bool = False) -> Iterator[None]:
    """Train on `loader` (the rest of epoch `state.epoch`), yielding after every optimiser
    step: the caller logs, checkpoints and stops between steps, and ends the epoch early by
    leaving its `for`. Each batch's loss, correct predictions and samples are added to every
    `Sums` in `sums`, padding left out (`remainder`: real samples in the epoch's last global
    batch, see last_batch_remainder). `state.batches_done`, `state.step` and
    `state.schedule_steps` advance here. `accelerator`: as in train_step (None: batches are
    moved to the model's device here, every batch is a step)."""
    device = None if accelerator else next(model.parameters()).device
    process = accelerator.process_index if accelerator else 0
    for batch in loader:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        key = (state.epoch, state.batches_done, process)
        per_sample, logits = train_step(model, optimizer, batch, loss_fn,
                                        accelerator=accelerator, mix=mix, key=key,
                                        channels_last=channels_last)
        weight = _real_samples(accelerator, len(per_sample), remainder) if accelerator \
            else None
        correct = (logits.argmax(-1) == batch["labels"]).float()
        for s in sums:
            s.add(per_sample, correct, weight)
        state.batches_done += 1
        if accelerator and not accelerator.sync_gradients:
            continue  # inside the accumulation window: no optimiser step was taken
        # the fp16 GradScaler skips the optimiser step on inf/nan gradients; the schedule
        # then waits too, so the lr still follows the steps actually taken
        if scheduler is not None:  # (the LR range test sets each step's lr itself)
            if not (accelerator and accelerator.optimizer_step_was_skipped):
                scheduler.step()
            state.schedule_steps = scheduler.last_epoch  # what a checkpoint resumes
        state.step += 1
        yield


def last_batch_remainder(loader: Iterable, num_processes: int) -> int:
    """Real samples in the last global batch of an epoch of `loader` (0: it is full, nothing
    padded), from the dataset's length and the global batch. Not Accelerate's
    `gradient_state.remainder`: a loader resumed with `skip_first_batches` may report -1
    there (its SkipBatchSampler hides the batch size), and the padding would then count."""
    dataset = getattr(loader, "dataset", None)
    if num_processes == 1 or dataset is None or \
            isinstance(dataset, torch.utils.data.IterableDataset):
        return 0  # one process pads nothing; --streaming drops the last partial batch
    try:
        batch = loader.total_batch_size
    except Exception:  # not a prepared loader: per-process batch x processes
        batch = loader.batch_size * num_processes
    return len(dataset) % batch


def _real_samples(accelerator, n, remainder):
    """Per-sample weights of this process's batch: 0 for the padding Accelerate adds to the
    last batch of an epoch on N processes, 1 elsewhere (as gather_for_metrics counts)."""
    gs = accelerator.gradient_state
    if accelerator.num_processes == 1 or not gs.end_of_dataloader or remainder <= 0:
        return None
    # the gathered last batch is the processes' batches in rank order, all of size n, and
    # its first `remainder` samples are real
    first = accelerator.process_index * n
    return (torch.arange(first, first + n, device=accelerator.device) < remainder).float()


@dataclasses.dataclass
class Totals:
    """An epoch's (or a window's) training sums over all processes, on the host."""

    loss: float = 0.0     # summed per-sample loss
    correct: float = 0.0  # correct predictions
    samples: float = 0.0  # samples (padding excluded)

    @classmethod
    def read(cls, saved: Union[dict, list]) -> "Totals":
        """From a train state: a dict, or the [loss, correct, samples] list of older ones."""
        return cls(*saved) if isinstance(saved, (list, tuple)) else cls(**saved)

    def metrics(self) -> dict:
        n = max(self.samples, 1)
        return dict(loss=self.loss / n, accuracy=self.correct / n, samples=int(self.samples))


class Sums:
    """Loss, correct predictions and samples, summed on the device (float64: exact counts)."""

    def __init__(self, device, start: Optional[Totals] = None):
        dtype = torch.float32 if device.type == "mps" else torch.float64
        start = start or Totals()
        self.t = torch.tensor([start.loss, start.correct, start.samples], dtype=dtype,
                              device=device)

    def add(self, per_sample: torch.Tensor, correct: torch.Tensor,
            weight: Optional[torch.Tensor]) -> None:
        if weight is None:
            weight = torch.ones_like(per_sample)
        self.t += torch.stack([(per_sample * weight).sum(), (correct * weight).sum(),
                               weight.sum()]).to(self.t.dtype)

    def reset(self) -> None:
        self.t.zero_()


def reduce_sums(accelerator: Accelerator, sums: Sums, stop: StopSignal) -> tuple[Totals, bool]:
    """All processes: the sums over processes and whether any process was signalled to
    stop. One all-reduce and one copy to the host."""
    flag = torch.tensor([float(stop.signum)], dtype=sums.t.dtype, device=sums.t.device)
    total = accelerator.reduce(torch.cat([sums.t, flag]), "sum").tolist()
    return Totals(*total[:3]), total[3] > 0


def check_finite(totals: Totals, state: TrainState) -> None:
    loss = totals.loss / max(totals.samples, 1)
    if not math.isfinite(loss):
        raise RunFailure(f"training loss became {loss} at epoch {state.epoch + 1}, step "
                        f"{state.step} or before; lower --lr (or train in fp32/bf16 instead "
                        "of fp16)")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, metrics: dict, class_names: list, *,
             accelerator: Optional[Accelerator] = None, tta: bool = False,
             channels_last: bool = False, progress: bool = True,
             autocast: bool = True) -> dict:
    """Exact loss/accuracy/per-class metrics over the whole eval set, on every rank.
    Per-sample results stay on the device until one gather at the end; Accelerate's padding
    repeats samples with their dataset index, so keeping one row per index counts every
    image exactly once. `accelerator` None: `loader` is this process's whole set (the
    linear probe's cached features), evaluated here alone, in the model's precision.
    `progress`: a progress bar on the local main process. `autocast` False: in fp32 whatever
    --mixed_precision says, as predict.py runs an exported model.

    Raises RunFailure: a sized val set evaluated short (see _expected_samples)."""
    model.eval()
    device = None if accelerator else next(model.parameters()).device
    parts = []
    # bounds the resident memory over many val batches of images on the CPU
    guard = HeapGuard(accelerator.device if accelerator else device)
    for batch in tqdm(loader, desc="val", leave=False, disable=not progress or
                      accelerator is None or not accelerator.is_local_main_process):
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        x, y = model_inputs(batch, channels_last)
        if x.ndim == 4:  # images (not cached features)
            guard()
        with accelerator.autocast() if accelerator and autocast else contextlib.nullcontext():
            logits = model(x).float()
            if tta and x.ndim == 4:  # --tta: the average over the image and its mirror
                logits = (logits + model(x.flip(-1)).float()) / 2
        per_sample = F.cross_entropy(logits, y, reduction="none")
        prob, pred = logits.softmax(-1).max(-1)
        parts.append((per_sample, pred, y, batch["index"], prob, logits))
    local = [torch.cat(p) for p in zip(*parts)]
    if accelerator is not None and accelerator.num_processes > 1:
        # (--streaming: the processes' parts differ in size)
        local = [accelerator.pad_across_processes(t, pad_index=-1 if k == 3 else 0)
                 for k, t in enumerate(local)]
        local = accelerator.gather(local)
    gathered = [t.cpu() for t in local]
    gathered = [t[gathered[3] >= 0] for t in gathered]  # not the padding
    index, first = _first_of_each(gathered[3])
    losses, preds, labels, _, prob, logits = (t[first] for t in gathered)
    expected = _expected_samples(loader, accelerator)
    if expected is not None and len(labels) != expected:
        raise RunFailure(f"the val set was evaluated on {len(labels)} of its {expected} "
                         "images (each image is counted once, by its index): its metrics "
                         "would be another set's; not reported")
    out = compute_metrics(metrics, preds, labels, class_names)
    # per image, as CPU tensors: the best epoch's go to best/predictions.safetensors (main
    # process), never into the train state
    out.update(loss=losses.mean().item(), samples=len(labels),
               predictions={"index": index, "pred": preds, "label": labels, "prob": prob,
                            "loss": losses, "logits": logits})
    return out


def _expected_samples(loader: Iterable, accelerator: Optional[Accelerator]) -> Optional[int]:
    """How many images an evaluation of `loader` must count: its dataset's size, less the
    images a stream skipped as unreadable on any process (`StreamDataset.skipped`). None
    where the loader has no sized dataset."""
    dataset = getattr(loader, "dataset", None)
    try:
        size = len(dataset)
    except TypeError:
        return None
    skipped = getattr(dataset, "skipped", None)
    if skipped is None:
        return size
    count = torch.tensor([float(skipped.value)], device=accelerator.device if accelerator
                         else "cpu")
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum")
    return size - int(count.item())


def _first_of_each(index):
    """(sorted unique indices, position of the first occurrence of each in `index`)."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    return sorted_index[keep], order[keep]
