"""--streaming: a Hub or parquet dataset read as a stream, never whole on disk or in memory.

`datasets.load_dataset(..., streaming=True)` gives an IterableDataset: examples are read and
decoded as training consumes them. Here:
- train is shuffled with a buffer (`--shuffle-buffer`, reseeded by seed + epoch) and divided
  with `split_dataset_by_node`, so each process reads only its part; each example's position
  in that part (`index`) seeds its augmentation;
- the epoch length comes from the split's known size (the dataset card's, or one pass over the
  label column when the card has none): every process takes exactly size // (processes x
  batch) batches per epoch, going round its part again if it runs short, so DDP never waits
  on a process that ran out (the few images left over change from epoch to epoch);
- validation is divided here, not by `datasets`: each of the (processes x loader workers)
  readers takes whole files (shards) when there are enough of them, else every n-th row, and
  each image's `index` is its file and row (`shard << 32 | row`), the same whoever reads it;
  results are gathered by index, and the images evaluated plus those skipped must make the
  split's size (`engine.evaluate` refuses a val set evaluated short);
- an image that does not decode is skipped with a warning when it is reached (there is no
  pass over all images up front);
- resuming mid-epoch reads past the batches already done.
Cached features (the extractor's default, the fine-tune's linear probe) need random access,
so they are off with --streaming.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable, Iterable, Iterator, TYPE_CHECKING

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from common.errors import UserError
from common.images import decode_image, seeded
from common.labels import label_out_of_range, unknown_labels
from common.log import logger


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import PartialState
    from common.config import TrainConfig


class StreamSplit:
    """One split of a streamed dataset: the IterableDataset (columns image, label, index),
    its size, class names, and label counts when a pass over the labels was made. `head`:
    the stream before its shuffle, to look at its first rows (image sizes) without filling
    the shuffle buffer."""

    def __init__(self, stream, size, label_index, counts, name="train", flag="--dataset",
                 num_classes=0, head=None):
        self.stream, self.size, self.label_index, self.counts = stream, size, label_index, counts
        self.name, self.flag, self.num_classes = name, flag, num_classes
        self.head = stream if head is None else head

    def __len__(self):
        return self.size


def _label_pass(stream):
    values = {}
    for row in stream.select_columns(["label"]):
        values[row["label"]] = values.get(row["label"], 0) + 1
    return values


def load_streaming(cfg: TrainConfig, name: str, val_names: tuple) -> tuple:
    """(train StreamSplit, val StreamSplit, class names) for --dataset NAME --streaming."""
    try:
        dd = datasets.load_dataset(name, streaming=True)
    except (ConnectionError, OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"--dataset {name} --streaming: could not open it as a stream "
                        f"({type(e).__name__}: {why})") from None
    if cfg.train_split not in dd:
        raise UserError(f"--dataset {name}: no split '{cfg.train_split}' (it has "
                        f"{', '.join(dd)}); pick one with --train-split")
    val_name = next((s for s in (cfg.val_split, *val_names) if s in dd and s != cfg.train_split),
                    None)
    if val_name is None:
        raise UserError(f"--dataset {name} --streaming: no validation split (it has "
                        f"{', '.join(dd)}); name one with --val-split, or drop --streaming")
    splits = {}
    for key, split in (("train", cfg.train_split), ("val", val_name)):
        ds = dd[split]
        columns = list(ds.features or {})
        for flag, col in (("--image-column", cfg.image_column),
                          ("--label-column", cfg.label_column)):
            if columns and col not in columns:
                raise UserError(f"--dataset {name}: no column '{col}' (it has "
                                f"{', '.join(columns)}); pick one with {flag}")
        ds = ds.select_columns([cfg.image_column, cfg.label_column])
        renames = {k: v for k, v in ((cfg.image_column, "image"), (cfg.label_column, "label"))
                   if k != v}
        if renames:
            ds = ds.rename_columns(renames)
        splits[key] = (ds, split)
    train, _ = splits["train"]
    feature = (train.features or {}).get("label")
    counts, val_counts = None, None
    flag = f"--dataset {name}"
    if isinstance(feature, datasets.ClassLabel):
        classes = feature.names
        val_feature = (splits["val"][0].features or {}).get("label")
        if isinstance(val_feature, datasets.ClassLabel) and val_feature.names != classes:
            raise UserError(f"{flag}: the train and {val_name} splits name different classes")
    else:  # plain ints or strings: one pass over the label columns (no image is read)
        counts = _label_pass(train)
        classes = [str(v) for v in sorted(counts)]
        val_counts = _label_pass(splits["val"][0])  # as without --streaming: up front
        unknown = sorted({str(v) for v in val_counts} - set(classes))
        if unknown:
            raise unknown_labels(flag, val_name, unknown)
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for key in ("train", "val"):
        ds, split = splits[key]
        info = dd[split].info.splits
        size = info[split].num_examples if info and split in info else None
        if counts is not None:
            size = sum((counts if key == "train" else val_counts).values())
        elif size is None:  # the card does not say: count (labels only, no image is read)
            size = sum(_label_pass(ds).values())
        ds = head = ds.cast_column("image", datasets.Image(decode=False))
        if key == "train":
            ds = ds.map(lambda ex, i: {"index": i}, with_indices=True)
            ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
        out.append(StreamSplit(ds, size, None if isinstance(feature, datasets.ClassLabel)
                               else index, counts if key == "train" else None,
                               name=split, flag=flag, num_classes=len(classes), head=head))
    logger.info(f"--dataset {name} --streaming: {out[0].size} train / {out[1].size} "
                f"'{val_name}' images, {len(classes)} classes")
    return out[0], out[1], classes


_ROW_BITS = 32  # a val image's index: shard << 32 | row within the shard


def val_rows(stream: datasets.IterableDataset, reader: int, readers: int) -> Iterator[dict]:
    """Reader `reader` of `readers`'s rows of a val stream, each with its `index` (its shard
    and row, the same whoever reads it). Every row goes to exactly one reader: whole shards
    when there are at least as many as readers, else every `readers`-th row of the stream.
    `IterableDataset.iter` is used, not `iter()`: the latter would divide the shard again
    among the DataLoader's workers."""
    shards = stream.num_shards
    by_shard = shards >= readers
    position = 0
    for k in range(shards):
        if by_shard and k % readers != reader:
            continue
        row = 0
        for batch in stream.shard(num_shards=shards, index=k).iter(batch_size=64):
            for values in zip(*batch.values()):
                if by_shard or position % readers == reader:
                    yield dict(zip(batch, values), index=k << _ROW_BITS | row)
                row, position = row + 1, position + 1


class StreamDataset(torch.utils.data.IterableDataset):
    """This process's part of a split, decoded and transformed like ImageDataset (RGB, the
    same per-image augmentation seeds). `seed` None: the val split, divided by `val_rows`;
    `skipped` counts the images that did not decode (shared with the loader's workers)."""

    def __init__(self, split, transform, rank, world, seed=None, min_side=None):
        self.split, self.transform, self.seed, self.min_side = split, transform, seed, min_side
        self.rank, self.world = rank, world
        self.part = split_dataset_by_node(split.stream, rank=rank, world_size=world) \
            if seed is not None else None
        self.epoch = mp.Value("i", 0, lock=False)
        self.skipped = mp.Value("i", 0)

    def __len__(self):  # the whole split, for reports
        return self.split.size

    def _rows(self):
        if self.part is not None:
            self.part.set_epoch(self.epoch.value)  # a new shuffle per epoch
            return iter(self.part)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return val_rows(self.split.stream, self.rank * workers + worker, self.world * workers)

    def __iter__(self):
        for ex in self._rows():
            src = ex["image"]
            try:
                img = decode_image(src, self.min_side)
            except Exception as e:  # a corrupt image: skipped here, as the pre-check would
                with self.skipped.get_lock():
                    self.skipped.value += 1
                logger.warning(f"skipping unreadable image {src.get('path') or ex['index']} "
                               f"({type(e).__name__})", main_process_only=False)  # its shard
                continue
            label = ex["label"] if self.split.label_index is None \
                else self.split.label_index[str(ex["label"])]
            if self.seed is None:
                x = self.transform(img)
            else:
                x = seeded(self.transform, img, int(np.random.SeedSequence(
                    [self.seed, self.epoch.value, ex["index"]]).generate_state(1)[0]))
            yield {"pixel_values": x, "labels": label, "index": ex["index"]}


class StreamLoader:
    """Batches of a StreamDataset on the device. `steps` set (training): exactly that many
    full batches per epoch, going round this process's part again if it runs short; None
    (validation): the part once."""

    def __init__(self, dataset, batch_size, workers, device, steps=None):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.device, self.steps, self._skip = device, steps, 0

    def __len__(self):
        return self.steps if self.steps is not None else \
            -(-len(self.dataset) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.value = epoch

    def skip(self, n: int) -> Iterable:
        """The rest of this epoch after `n` batches (a resumed run: they are read, not used)."""
        self._skip = n
        return self

    def _batches(self):
        self.dataset.skipped.value = 0  # counted anew each pass
        # a fresh loader per pass: workers must see this epoch's shuffle
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size,
                                           num_workers=self.workers,
                                           drop_last=self.steps is not None,
                                           pin_memory=self.device.type == "cuda")

    def _check_labels(self, labels):
        """A ClassLabel stream is not read up front: its labels are checked here, on the CPU
        batch in the main process (no device sync; one line, not a device-side assert)."""
        split = self.dataset.split
        bad = labels[(labels < 0) | (labels >= split.num_classes)]
        if split.num_classes and len(bad):
            raise label_out_of_range(split.flag, split.name, int(bad[0]), split.num_classes)

    def __iter__(self):
        done, skip, self._skip = 0, self._skip, 0
        while self.steps is None or done < self.steps:
            produced = False
            for batch in self._batches():
                produced = True
                if done >= skip:
                    self._check_labels(batch["labels"])
                    yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                done += 1
                if self.steps is not None and done >= self.steps:
                    return
            if self.steps is None:
                return
            if not produced:
                raise UserError("--streaming: this process's part of the training split "
                                f"holds fewer than --batch-size {self.batch_size} images")


def streaming_loaders(train: Any, val: Any, train_tf: Callable, eval_tf: Callable, cfg: TrainConfig,
                      *, accelerator: PartialState, workers: int, sides: tuple) -> tuple:
    """(train StreamLoader, val StreamLoader) for this process."""
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * world
    steps = len(train) // per_step // cfg.gradient_accumulation_steps * \
        cfg.gradient_accumulation_steps
    if steps == 0:
        raise UserError(f"--streaming: {len(train)} training images are fewer than one step of "
                        f"{per_step} (--batch-size x processes)")
    train_ds = StreamDataset(train, train_tf, rank, world, seed=cfg.seed, min_side=sides[0])
    val_ds = StreamDataset(val, eval_tf, rank, world, min_side=sides[1])
    return (StreamLoader(train_ds, cfg.batch_size, workers, accelerator.device, steps),
            StreamLoader(val_ds, cfg.batch_size, workers, accelerator.device))
