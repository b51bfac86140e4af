"""Images and labels through HF `datasets`, the tutorial's transforms, and DataLoaders.

Sources:
- `--data-dir DIR`: DIR/train/<class>/* and DIR/val/<class>/*, read with torchvision
  ImageFolder's rules (sorted class folders; only files with its image extensions, so the
  ants/bees set's stray `.gif` is not an image here: 244 train / 153 val images). The file
  lists become a `datasets.Dataset` whose Image feature decodes lazily from disk.
- `--dataset NAME|PATH`: a Hub dataset, a folder of parquet/arrow files, or a
  `save_to_disk()` folder, with `--image-column` / `--label-column` and split names.
Without a validation split, a stratified, seeded `--val-fraction` is split off train.

Transforms follow the tutorial (RandomResizedCrop + horizontal flip for training; Resize +
CenterCrop for evaluation) with input size, resize, mean/std and interpolation taken from
the model's pretrained config (`preprocessing`), never hard-coded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import multiprocessing as mp
import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional, TYPE_CHECKING

import datasets
import numpy as np
import pyarrow
import torch
from torchvision.transforms import v2

from common.download import bundled_hymenoptera, ensure_hymenoptera
from common.errors import UserError
from common.hardware import launcher_chose_cpu
from common.imagecheck import drop_unreadable, identity_digest
from common.images import decode_image, decode_sizes, seeded
from common.labels import check_label_range, labels_of, unknown_labels
from common.log import logger
from common.memory import keep_host_memory
from common.streaming import load_streaming, streaming_loaders


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig


@dataclasses.dataclass
class Data:
    """What a run trains and evaluates on."""

    class_names: list
    train_loader: Any           # batches of images (or of cached features)
    val_loader: Any
    train_images: Any           # the decoded image datasets, for the pictures (the loaders
    val_images: Any             # may serve cached features instead)
    class_weights: Optional[list] = None  # --class-weights auto: a weight per class


# torchvision.datasets.folder.IMG_EXTENSIONS: what ImageFolder counts as an image.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_SPLIT_FALLBACKS = ("validation", "val", "valid", "test")


def image_files(folder: str) -> list:
    """Image files below `folder`, recursively and sorted, by ImageFolder's rules (its
    extensions, hidden files skipped): one rule for training and for predict.py. A link to a
    folder is followed once per real folder, and never to a folder that holds `folder`, so
    a link back up the tree neither lists an image twice (or another class's) nor loops; an
    entry that is not a regular file (a FIFO, a device, a broken link) is skipped with a
    warning: reading it would block or fail."""
    root = os.path.realpath(folder)
    listed, seen = [], set()
    pending = [folder]
    while pending:
        here = pending.pop()
        real = os.path.realpath(here)
        if real in seen or (here != folder and root.startswith(real.rstrip(os.sep) + os.sep)):
            continue
        seen.add(real)
        try:
            entries = list(os.scandir(here))
        except OSError as e:
            logger.warning(f"skipping folder {here} ({type(e).__name__})")
            continue
        names = []
        for entry in entries:
            if entry.is_dir():  # (a link to a folder too)
                pending.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS) and \
                    not entry.name.startswith("."):
                if entry.is_file():  # (a link to a regular file too)
                    names.append(entry.name)
                else:
                    logger.warning(f"skipping {entry.path}: not a regular file")
        listed.append((here, sorted(names)))
    return [os.path.join(dirpath, name) for dirpath, names in sorted(listed) for name in names]


def _scan_split(split_dir, flag):
    """(files, labels, classes) of one split folder, ImageFolder-style."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise UserError(f"{flag}: {split_dir} has no class sub-folders (expected "
                        f"{split_dir}/<class>/<image>)")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = image_files(os.path.join(split_dir, cls))
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(f"{flag}: no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return files, labels, classes


def _to_dataset(files, labels, classes):
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({"image": files, "label": labels}, features=features)


def load_image_folder(data_dir: str, val_fraction: float,
                      seed: int) -> tuple[datasets.Dataset, datasets.Dataset, list]:
    """(train, val, class_names) from an image folder with train/ and optionally val/."""
    flag = f"--data-dir {data_dir}"
    if not os.path.isdir(data_dir):
        raise UserError(f"{flag}: no such folder")
    train_dir, val_dir = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
    if not os.path.isdir(train_dir):
        raise UserError(f"{flag}: expected a train/ folder (and val/) with one sub-folder "
                        "per class inside")
    files, labels, classes = _scan_split(train_dir, flag)
    train = _to_dataset(files, labels, classes)
    if not os.path.isdir(val_dir):
        return (*_split_off_val(train, val_fraction, seed, f"{data_dir} has no val/ folder"),
                classes)
    vfiles, vlabels, vclasses = _scan_split(val_dir, flag)
    if vclasses != classes:
        only_t, only_v = sorted(set(classes) - set(vclasses)), sorted(set(vclasses) - set(classes))
        raise UserError(f"{flag}: train/ and val/ have different class folders (only in train: "
                        f"{only_t or '-'}; only in val: {only_v or '-'}); make them match")
    return train, _to_dataset(vfiles, vlabels, classes), classes


def _split_off_val(train, val_fraction, seed, why):
    counts = torch.bincount(torch.tensor(labels_of(train)))
    stratify = "label" if int(counts.min()) >= 2 else None
    parts = train.train_test_split(test_size=val_fraction, seed=seed, stratify_by_column=stratify)
    logger.info(f"{why}: holding out {len(parts['test'])} of {len(train)} training images "
                f"(--val-fraction {val_fraction}, seed {seed}) for validation")
    return parts["train"], parts["test"]


def load_hub_dataset(cfg: TrainConfig) -> tuple[datasets.Dataset, datasets.Dataset, list]:
    """(train, val, class_names) from `--dataset` with the configured columns and splits."""
    name = cfg.dataset
    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
            dd = datasets.load_from_disk(name)
        else:
            dd = datasets.load_dataset(name)
    except (ConnectionError, OSError) as e:
        raise UserError(f"--dataset {name}: could not load it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); offline, use a local "
                        "folder: --data-dir DIR or --dataset PATH") from None
    except ValueError as e:  # e.g. "Unknown split", unsupported files
        raise UserError(f"--dataset {name}: {str(e).splitlines()[0]}") from None
    if not isinstance(dd, datasets.DatasetDict):
        dd = datasets.DatasetDict({"train": dd})
    if cfg.train_split not in dd:
        raise UserError(f"--dataset {name}: no split '{cfg.train_split}' (it has "
                        f"{', '.join(dd)}); pick one with --train-split")
    train = dd[cfg.train_split]
    columns = train.column_names
    for flag, col in (("--image-column", cfg.image_column), ("--label-column", cfg.label_column)):
        if col not in columns:
            raise UserError(f"--dataset {name}: no column '{col}' (it has {', '.join(columns)}); "
                            f"pick one with {flag}")
    val_name = next((s for s in (cfg.val_split, *VAL_SPLIT_FALLBACKS)
                     if s in dd and s != cfg.train_split), None)
    if val_name is not None and val_name != cfg.val_split:
        logger.info(f"--dataset {name}: no '{cfg.val_split}' split, so '{val_name}' selects the "
                    f"best epoch and is reported as val (pass --val-split to choose another)")
    splits = {"train": train} if val_name is None else {"train": train, "val": dd[val_name]}
    for key, ds in splits.items():
        ds = ds.select_columns([cfg.image_column, cfg.label_column])
        ds = ds.rename_columns({cfg.image_column: "image", cfg.label_column: "label"})
        if not isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image())
        splits[key] = ds
    train, classes = _encode_labels(splits["train"], f"--dataset {name}", "train")
    if "val" not in splits:
        train, val = _split_off_val(train, cfg.val_fraction, cfg.seed,
                                    f"--dataset {name} has no validation split")
    else:
        val, val_classes = _encode_labels(splits["val"], f"--dataset {name}", val_name, classes)
        if val_classes != classes:
            raise UserError(f"--dataset {name}: the train and {val_name} splits name "
                            "different classes")
    # a ClassLabel column is taken as it is: check it (image folders and labels encoded
    # above are in range by construction)
    check_label_range(train, len(classes), f"--dataset {name}", cfg.train_split)
    check_label_range(val, len(classes), f"--dataset {name}", val_name or "held-out val")
    return train, val, classes


def _encode_labels(ds, flag, split, classes=None):
    """(ds with a ClassLabel 'label' column, class names). Labels that are not a ClassLabel
    (ints or strings) are mapped through one value -> index table made from train (sorted
    numerically for ints, alphabetically for strings) and applied to val as it is, so that
    train and val always agree (datasets' class_encode_column would sort ints as text,
    "10" before "2", and leave val's raw ints alone)."""
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return ds, feature.names
    values = labels_of(ds)  # the label column only (ints or strings), not the images
    if classes is None:
        kinds = {type(v) for v in values}
        if len(kinds) > 1:
            found = ", ".join(sorted(k.__name__ for k in kinds))
            raise UserError(f"{flag}: the {split} labels mix types ({found}); make them all "
                            "strings or all integers")
        classes = [str(v) for v in sorted(set(values))]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise unknown_labels(flag, split, unknown)
    encoded = [index[str(v)] for v in values]
    # replace the column (no copy of the image bytes, as map() would make)
    ds = ds.remove_columns("label").add_column(
        "label", encoded, feature=datasets.ClassLabel(names=classes))
    return ds, classes


def build_transforms(preprocessing: dict, train_crop_scale: float = 0.08, augment: str = "basic",
                     random_erasing: float = 0.0, train_size: Optional[int] = None
                     ) -> tuple[v2.Compose, v2.Compose]:
    """(train, eval) transforms from the model's preprocessing config. Training: the
    tutorial's RandomResizedCrop + horizontal flip, then optionally TrivialAugmentWide or
    RandAugment, and RandomErasing (after normalising: erased pixels become the mean). The
    training crops are `train_size` pixels (default: the model's input size).

    The resizes run on the decoded PIL image, as in the tutorial and timm. Resizing a uint8
    tensor instead (torchvision's vectorised kernels, about half the CPU time per image) is
    within one intensity level of PIL's result, but fine-tuned clothing 5 and 7 of 495 val
    images lower at two seeds (benchmarks/README.md, issue 33): the decode of a batch runs
    on threads instead (ImageDataset.__getitems__)."""
    p = preprocessing
    interp = v2.InterpolationMode(p["interpolation"])
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=p["mean"], std=p["std"])]
    policy = {"basic": [], "trivial": [v2.TrivialAugmentWide(interpolation=interp)],
              "randaugment": [v2.RandAugment(interpolation=interp)]}[augment]
    erase = [v2.RandomErasing(p=random_erasing)] if random_erasing > 0 else []
    train = v2.Compose([v2.RandomResizedCrop(train_size or p["input_size"],
                                             scale=(train_crop_scale, 1.0),
                                             interpolation=interp, antialias=True),
                        v2.RandomHorizontalFlip(), *policy, *tail, *erase])
    evaluation = v2.Compose([v2.Resize(p["resize"], interpolation=interp, antialias=True),
                             v2.CenterCrop(p["input_size"]), *tail])
    return train, evaluation


def training_transforms(preprocessing: dict, cfg: TrainConfig, *, for_features: bool = False
                        ) -> tuple[v2.Compose, v2.Compose]:
    """build_transforms with the run's augmentation flags, and the fine-tune's --train-size
    unless `for_features` (cached features are computed at the input size)."""
    return build_transforms(preprocessing, cfg.train_crop_scale, cfg.augment, cfg.random_erasing,
                            None if for_features else getattr(cfg, "train_size", None))


class BalancedSampler(torch.utils.data.Sampler):
    """--sampler balanced: each epoch draws len(labels) indices with replacement, every class
    equally likely, from a generator seeded by (seed, epoch): the same order on every
    process (Accelerate then gives each its share) and after a resume."""

    def __init__(self, labels, seed):
        labels = torch.as_tensor(labels)
        counts = torch.bincount(labels).clamp(min=1).double()
        self.weights = 1.0 / counts[labels]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.weights)

    def __iter__(self):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [self.seed, self.epoch, 1]).generate_state(1)[0]))
        return iter(torch.multinomial(self.weights, len(self.weights), replacement=True,
                                      generator=g).tolist())


def label_counts(split: datasets.Dataset, num_classes: int) -> list:
    """Images per class: from the label column, or from a stream's label pass."""
    if getattr(split, "counts", None) is not None:
        return torch.tensor([split.counts.get(v, 0) for v in sorted(split.counts)])
    if hasattr(split, "stream"):
        raise UserError("--class-weights auto / --sampler balanced with --streaming need the "
                        "label counts, which this dataset's card does not give; drop them")
    return torch.bincount(torch.as_tensor(labels_of(split)), minlength=num_classes)


def class_weights(cfg: TrainConfig, split: datasets.Dataset, num_classes: int) -> Optional[list]:
    """--class-weights auto: N / (classes x count of the class), so that every class weighs
    as much in the loss as a balanced set would make it (None: plain mean)."""
    if cfg.class_weights != "auto":
        return None
    counts = label_counts(split, num_classes)
    return (counts.sum() / (num_classes * counts.clamp(min=1).double())).tolist()


def train_order(cfg: TrainConfig, labels: torch.Tensor) -> dict:
    """DataLoader keyword arguments for the training order (--sampler)."""
    if cfg.sampler == "balanced":
        return dict(sampler=BalancedSampler(labels, cfg.seed))
    return dict(shuffle=True)


class ImageDataset(torch.utils.data.Dataset):
    """A split for the DataLoader: decode -> RGB -> transform, as {"pixel_values", "labels",
    "index"}. `dataset[i]` is one transformed sample; a DataLoader over it takes
    `collate_fn=dataset.collate(channels_last)`, as its batches' pixels stay uint8 until
    collated (see __getitems__).

    With `seed` set (training), sample i of epoch e is augmented under its own RNG seed
    (seed, e, i), in a forked RNG so the global RNG is untouched (with `views` K: (seed,
    e mod K, i), K fixed augmentations cycled over the epochs). Augmentation is then a pure
    function of the data, not of the worker count, the process count, or where a resumed run
    picked up: what makes `--resume-from-checkpoint` land on exactly the same result.
    `epoch` is shared memory, so loader workers see the epoch the main process sets.

    Without a seed, `cache_bytes` > 0 keeps the samples' uint8 pixels after their first read,
    up to that many bytes (the val set: see _cached_items).
    """

    def __init__(self, split, transform, seed=None, views=None, min_side=None,
                 cache_bytes=0):
        # decoded here (decode_image), not by the datasets Image feature: at reduced scale
        self.split = split.cast_column("image", datasets.Image(decode=False))
        self.transform, self.seed, self.views, self.min_side = transform, seed, views, min_side
        # a batch's samples stop at uint8 pixels; `collate` converts and normalises them
        self.pixels, self.normalise = _split_normalisation(transform)
        # the augmentation's draws apart from its pixel work, where they can be
        self.draws = _RandomDraws.of(self.pixels) if seed is not None else None
        self.epoch = mp.Value("i", 0, lock=False)
        # an evaluation set's uint8 samples, the same every epoch (see _cached_items)
        self.cache = PixelCache(cache_bytes) \
            if cache_bytes > 0 and seed is None and self.normalise is not None else None

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        row = self.split[i]
        img = decode_image(row["image"], self.min_side)
        x = self.transform(img) if self.seed is None else self._augment(self.transform, img, i)
        return {"pixel_values": x, "labels": row["label"], "index": i}

    def __getitems__(self, indices: list) -> list:
        """A batch's samples (the DataLoader asks for them when the dataset has this method),
        for `collate`: the rows in one Arrow read, the images decoded on this process's idle
        compute threads (PIL releases the GIL while it decodes and resizes). Without a seed
        the transform runs there too. A seeded (augmenting) transform draws from torch's one
        global RNG, so its draws are made here, in index order: the default augmentation's
        (the crop's box and the flip) alone, its resize then running on the threads
        (_RandomDraws); any other, whole. The pixels stay uint8 where the transform ends by
        normalising (`collate` does it for the whole batch); collated, the same batch as
        __getitem__'s samples stacked, to the bit."""
        if self.cache is not None:
            return self._cached_items(indices)
        return self._read_items(indices)

    def _cached_items(self, indices: list) -> list:
        """__getitems__ through the cache: an evaluation transform gives every epoch the same
        uint8 pixels, so each image is read, decoded and resized once (the first epoch), and
        served from memory after that while the cache's budget lasts (the images past it are
        read every time, as without a cache). The cached tensors are never written to:
        `collate` copies them into the batch."""
        samples = {i: self.cache.get(i) for i in indices}
        missing = [i for i in indices if samples[i] is None]
        if missing:
            for s in self._read_items(missing):
                samples[s["index"]] = s
                self.cache.put(s["index"], s)
        return [samples[i] for i in indices]

    def _read_items(self, indices: list) -> list:
        rows = self.split[indices]
        pool = _decode_pool()
        run = pool.map if pool is not None else map

        def decode(img):
            return decode_image(img, self.min_side)

        if self.seed is None:
            xs = run(lambda img: self.pixels(decode(img)), rows["image"])
        elif self.draws is not None and pool is not None:
            # each image's draws as soon as it is decoded (pool.map yields in order), its
            # resize queued behind the decodes still running: no thread waits on the batch
            futures = [pool.submit(self.draws.apply, img, self._augment(self.draws.draw, img, i))
                       for img, i in zip(run(decode, rows["image"]), indices)]
            xs = (f.result() for f in futures)
        else:
            xs = (self._augment(self.pixels, img, i)
                  for img, i in zip(run(decode, rows["image"]), indices))
        return [{"pixel_values": x, "labels": y, "index": i}
                for x, y, i in zip(xs, rows["label"], indices)]

    def _augment(self, transform, img, i):
        """`transform` (seeded) of sample i in this epoch's view."""
        # --feature-views K: K augmentations per image, epoch e uses view e mod K (what the
        # extractor's cached features hold)
        view = self.epoch.value % self.views if self.views else self.epoch.value
        return seeded(transform, img, int(np.random.SeedSequence(
            [self.seed, view, i]).generate_state(1)[0]))

    def collate(self, channels_last: bool = False) -> "ImageCollate":
        """The DataLoader's collate_fn for this dataset's batches (__getitems__' samples)."""
        return ImageCollate(self.normalise, channels_last)


def _split_normalisation(transform):
    """(the transform up to uint8 pixels, (mean, std)) when `transform` ends as
    build_transforms' do (ToImage, ToDtype to scaled float32, Normalize); (transform, None)
    otherwise (--random-erasing erases after normalising)."""
    ts = getattr(transform, "transforms", [])
    if len(ts) >= 3 and isinstance(ts[-3], v2.ToImage) and isinstance(ts[-2], v2.ToDtype) \
            and ts[-2].dtype == torch.float32 and ts[-2].scale \
            and isinstance(ts[-1], v2.Normalize) and not ts[-1].inplace:
        return v2.Compose(ts[:-2]), (list(ts[-1].mean), list(ts[-1].std))
    return transform, None


class PixelCache:
    """Samples by index, up to a budget of bytes of pixels: once full, it keeps what it holds
    and takes nothing more. In a loader worker each worker holds its own, with its share of
    the budget (an evaluation loader hands each worker the same batches every epoch)."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used, self.samples = budget_bytes, 0, {}

    def get(self, i: int) -> Optional[dict]:
        return self.samples.get(i)

    def put(self, i: int, sample: dict) -> None:
        size = sample["pixel_values"].nbytes
        info = torch.utils.data.get_worker_info()
        if self.used + size <= self.budget // (info.num_workers if info else 1):
            self.samples[i] = sample
            self.used += size


def val_cache_bytes(cfg: TrainConfig) -> int:
    """--val-cache-mb in bytes; -1: 1/16 of the machine's memory, at most 1 GiB (the 224-pixel
    uint8 pixels of ~7,000 val images)."""
    if cfg.val_cache_mb >= 0:
        return cfg.val_cache_mb << 20
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        total = 8 << 30
    return min(1 << 30, total // 16)


class _RandomDraws:
    """A seeded augmentation split into its random draws (`draw`, under the sample's seed, on
    the thread that owns the RNG) and its pixel work (`apply`, on any thread): for
    build_transforms' default, RandomResizedCrop then RandomHorizontalFlip then transforms
    that draw nothing. `draw` makes torchvision's calls in its order (the crop's
    make_params on the image, then the flip's `torch.rand(1) >= p`), so the same numbers come
    out as from the whole transform."""

    NO_DRAWS = (v2.ToImage, v2.ToDtype, v2.Normalize, v2.Resize, v2.CenterCrop)

    def __init__(self, crop, flip, rest):
        self.crop, self.flip, self.rest = crop, flip, rest

    @classmethod
    def of(cls, transform) -> Optional["_RandomDraws"]:
        """The split of `transform`, or None (another augmentation: it runs whole)."""
        ts = list(getattr(transform, "transforms", []))
        crop = ts.pop(0) if ts and type(ts[0]) is v2.RandomResizedCrop else None
        flip = ts.pop(0) if ts and type(ts[0]) is v2.RandomHorizontalFlip else None
        if crop is None and flip is None or any(type(t) not in cls.NO_DRAWS for t in ts):
            return None
        return cls(crop, flip, v2.Compose(ts))

    def draw(self, img) -> tuple:
        box = self.crop.make_params([img]) if self.crop is not None else None
        flipped = self.flip is not None and not bool(torch.rand(1) >= self.flip.p)
        return box, flipped

    def apply(self, img, drawn: tuple):
        box, flipped = drawn
        if box is not None:
            img = self.crop.transform(img, box)
        if flipped:
            img = self.flip.transform(img, {})
        return self.rest(img)


class ImageCollate:
    """Stacks ImageDataset samples into a batch in the model's memory layout, and converts
    and normalises uint8 pixels there, as one tensor: torchvision's ToDtype and Normalize
    (x * (1 / 255), then (x - mean) / std, in float32) element by element, so the same
    numbers as image by image, for about half the CPU time (the stack moves uint8 instead of
    float32, and the arithmetic runs on every compute thread). Channels-last: each image's
    HWC pixels are copied as they lie (ToImage's CHW tensor is a view of them), so the batch
    needs no second, transposing copy before the model."""

    def __init__(self, normalise: Optional[tuple], channels_last: bool):
        self.normalise, self.channels_last = normalise, channels_last

    def __call__(self, samples: list) -> dict:
        xs = [s["pixel_values"] for s in samples]
        uint8 = xs[0].dtype == torch.uint8 and self.normalise is not None
        if self.channels_last and xs[0].ndim == 3:
            nhwc = torch.stack([t.permute(1, 2, 0) for t in xs])
            x = (_normalise_rows(nhwc, *self.normalise) if uint8 else nhwc).permute(0, 3, 1, 2)
        else:
            x = torch.stack(xs)
            if uint8:
                mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                             for v in self.normalise)
                x = x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)
        rest = torch.utils.data.default_collate(
            [{k: v for k, v in s.items() if k != "pixel_values"} for s in samples])
        return {"pixel_values": x, **rest}


def _normalise_rows(nhwc: torch.Tensor, mean: list, std: list) -> torch.Tensor:
    """ImageCollate's arithmetic on a channels-last batch: float32 of the uint8 pixels,
    x * (1 / 255), then (x - mean) / std, over rows of W x C values with the channels' mean and
    std repeated along the row. The same operations on every element as a (1, C, 1, 1)
    broadcast, which loops over runs of C = 3 values in this memory layout: the collate
    took 0.34-0.42 ms an image that way, 0.13-0.17 ms this way (224 pixels, 2 threads,
    benchmarks/extract_phases.py; benchmarks/README.md, issue 33, run 7)."""
    n, h, w, c = nhwc.shape
    rows = nhwc.to(torch.float32).view(n * h, w * c)
    rows.mul_(1.0 / 255)
    # (expand: one value for every channel, as Normalize broadcasts it)
    rows.sub_(torch.tensor(mean, dtype=torch.float32).expand(c).repeat(w))
    rows.div_(torch.tensor(std, dtype=torch.float32).expand(c).repeat(w))
    return rows.view(n, h, w, c)


_POOLS: dict = {}


def _decode_pool() -> Optional[ThreadPoolExecutor]:
    """Threads to decode a batch on in this process, or None: in a loader worker (the workers
    are the parallelism there) or with one compute thread. As many as torch's compute
    threads, which wait while the batch is read; one pool per process (a forked child gets
    its own: threads do not survive fork)."""
    threads = torch.get_num_threads()
    if threads < 2 or torch.utils.data.get_worker_info() is not None:
        return None
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    return _POOLS[key]


def set_epoch(loader: Iterable, epoch: int) -> None:
    """Start epoch `epoch` of a prepared training loader: the sampler's shuffle (seed + epoch,
    identical on every rank) and the augmentation seeds."""
    loader.set_epoch(epoch)
    loader.dataset.epoch.value = epoch


def _worker_ignores_stop_signals(worker_id):
    """Clusters (and Ctrl-C) signal the whole process group: loader workers ignore SIGTERM/
    SIGINT so the training process can save a checkpoint before they are shut down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_num_workers(num_processes: int) -> int:
    """Loader workers per training process, from the CPU cores nobody else uses. With a GPU,
    one core per process drives it and the rest decode. Training on the CPU, every process
    already runs torch's threads (`accelerate launch` sets --num_cpu_threads_per_process),
    so a worker only steals compute from them: measured on 2 cores, EfficientNet-Lite0 trained
    at 73% of its bare forward+backward rate with 1 worker and 87% with none, and
    its features were extracted in 16.4 s with 1 worker, 14.4 s with none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = torch.get_num_threads() if launcher_chose_cpu() else 1
    return max(0, min(8, (cores - num_processes * per_process) // max(1, num_processes)))


def data_identity(data: Data) -> Optional[str]:
    """A digest of the train and val images' identities (each file's path, size and mtime,
    or the dataset's fingerprint: imagecheck.identity_digest), or None for a stream."""
    splits = [getattr(d, "split", None) for d in (data.train_images, data.val_images)]
    if not all(isinstance(s, datasets.Dataset) for s in splits):
        return None
    return hashlib.sha256("|".join(map(identity_digest, splits)).encode()).hexdigest()[:32]


def num_workers(cfg: TrainConfig, num_processes: int) -> int:
    return cfg.num_workers if cfg.num_workers >= 0 else default_num_workers(num_processes)


def build_dataloaders(train: Any, val: Any, preprocessing: dict, cfg: TrainConfig,
                      num_processes: int, *, views: Optional[int] = None,
                      channels_last: bool = False) -> tuple:
    """Train (shuffled) and eval DataLoaders, before `accelerator.prepare`. The shuffle order
    comes from Accelerate's seedable sampler (see accelerator.py), seeded with --seed + epoch.
    `views`: None = a new augmentation every epoch; K >= 1 = K augmentations per image,
    cycled; 0 = no augmentation (the evaluation transform, centre crop). `channels_last`:
    batches in the model's memory layout (network.channels_last)."""
    train_tf, eval_tf = training_transforms(preprocessing, cfg)
    train_side, eval_side = decode_sizes(preprocessing, cfg)
    if views == 0:
        train_tf, train_side = eval_tf, eval_side
    workers = num_workers(cfg, num_processes)
    if hasattr(train, "stream"):  # --streaming
        from accelerate import PartialState

        if cfg.sampler == "balanced":
            raise UserError("--sampler balanced needs random access; with --streaming use "
                            "--class-weights auto")
        return streaming_loaders(train, val, train_tf, eval_tf, cfg, accelerator=PartialState(),
                                 workers=workers, sides=(train_side, eval_side))
    common = dict(batch_size=cfg.batch_size, num_workers=workers,
                  persistent_workers=workers > 0, pin_memory=not launcher_chose_cpu(),
                  worker_init_fn=_worker_ignores_stop_signals,
                  # a private generator: creating an iterator never draws from the global RNG
                  generator=torch.Generator().manual_seed(cfg.seed))
    train_ds = ImageDataset(train, train_tf, seed=None if views == 0 else cfg.seed,
                            views=views, min_side=train_side)
    val_ds = ImageDataset(val, eval_tf, min_side=eval_side, cache_bytes=val_cache_bytes(cfg))
    train_loader = torch.utils.data.DataLoader(
        train_ds, collate_fn=train_ds.collate(channels_last),
        **train_order(cfg, labels_of(train)), **common)
    val_loader = torch.utils.data.DataLoader(val_ds, collate_fn=val_ds.collate(channels_last),
                                             shuffle=False, **common)
    return train_loader, val_loader


def load_data(cfg: TrainConfig, accelerator: Accelerator) -> tuple:
    """(train, val, class_names) from --data-dir, --dataset, or the tutorial's ants/bees set
    (the compact copy shipped with the package; --download-original-data: the original
    archive, downloaded into data/ by the main process first), without the images that do
    not decode."""
    previous_pool = _arrow_memory_that_returns()
    if cfg.streaming:  # nothing is checked or cached up front (common/streaming.py)
        with contextlib.redirect_stderr(sys.stderr if accelerator.is_main_process
                                        else io.StringIO()):
            splits = load_streaming(cfg, cfg.dataset, VAL_SPLIT_FALLBACKS)
        _arrow_memory_back(previous_pool)  # as below
        keep_host_memory(accelerator.device)
        _two_classes_at_least(splits[2], cfg)
        return splits
    if cfg.dataset:
        with accelerator.main_process_first():  # one process fills the datasets cache
            train, val, classes = load_hub_dataset(cfg)
    else:
        data_dir = cfg.data_dir
        if data_dir is None and cfg.download_original_data:
            with accelerator.main_process_first():
                data_dir = ensure_hymenoptera("data")
        elif data_dir is None:
            with contextlib.redirect_stderr(sys.stderr if accelerator.is_main_process
                                            else io.StringIO()):
                data_dir = bundled_hymenoptera()
        train, val, classes = load_image_folder(data_dir, cfg.val_fraction, cfg.seed)
    _two_classes_at_least(classes, cfg)
    # each process checks a shard, the verdicts are shared and cached (common/imagecheck.py)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, cores // accelerator.num_processes)
    train = drop_unreadable(train, "train", cfg.strict_images, accelerator, workers)
    val = drop_unreadable(val, "val", cfg.strict_images, accelerator, workers)
    if len(train) == 0 or len(val) == 0:
        raise UserError("no readable images left in train or val; check the data")
    _arrow_memory_back(previous_pool)
    # from here on, the training steps keep their freed memory for the next step (not while
    # loading: the conversion's freed buffers would stay in the heap for the whole run)
    keep_host_memory(accelerator.device)
    return train, val, classes


def _two_classes_at_least(classes: list, cfg: TrainConfig) -> None:
    """One class trains to loss 0 and scores 1.0 on anything: not a classifier."""
    if len(classes) < 2:
        where = f"--dataset {cfg.dataset}" if cfg.dataset else \
            f"--data-dir {cfg.data_dir or 'the bundled data'}"
        raise UserError(f"{where}: {len(classes)} class ({', '.join(map(str, classes))}); a "
                        "classifier needs at least 2 (one folder, or one label value, each)")


def _arrow_memory_that_returns():
    """The first load of a parquet (Hub) set converts it into datasets' Arrow cache, a row
    group (up to ~100 MB of images) at a time. pyarrow's default allocator in its wheels,
    mimalloc, kept every row group's memory: the first run's anonymous memory grew with the
    data (peak +240 MB at 20k images of 9 KB, +400 MB at 60k, held to the end of the run),
    while a second run, from the cache, stayed flat. jemalloc with immediate purging hands
    each row group back: the conversion then costs about one row group's worth, whatever
    the number of files (benchmarks/scale.py --evaluate-only; benchmarks/README.md).
    Returns the pool to put back once the data is loaded."""
    previous = pyarrow.default_memory_pool()
    try:
        pyarrow.jemalloc_set_decay_ms(0)
        pyarrow.set_memory_pool(pyarrow.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc: keep its default
        pass
    return previous


def _arrow_memory_back(previous):
    """After loading: the memory the loading pool still holds back to the system, and the
    default pool again for the reads of training and extraction (where jemalloc's immediate
    purging only adds page faults)."""
    pyarrow.default_memory_pool().release_unused()
    pyarrow.set_memory_pool(previous)
    previous.release_unused()
