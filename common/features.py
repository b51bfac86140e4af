"""Extractor fast path: the frozen backbone's features, computed once, cached, reused.

A frozen backbone in eval mode is a fixed function, so recomputing it on every image in every
epoch (as the tutorial does) is wasted work. Here each image goes through the model once per
view; forward pre-hooks on the classifier heads capture what the heads receive (the pooled
features; for distilled models with `head` and `head_dist`, both token features side by
side). The extraction is sharded across processes, gathered exactly, and written by each
machine's main process into a cache file, memory-mapped, so N x views x dim floats need not
fit in RAM. The heads then train on the cached vectors (`FeatureHeads`: each head on its
slice, outputs averaged, as timm's distilled models combine them in eval), with the same
loop, sampler and seeds as the on-the-fly path, and the exported model is the whole network.

Views (`--feature-views K`): 0 caches one un-augmented centre view per training image (a
linear probe); K >= 1 caches K augmented views (view v = the augmentation of epoch v) and
epoch e trains on view e mod K, exactly as `--no-cache-features --feature-views K` does on
the fly. Validation always has one centre view.

Precision (`--extract-precision`): the forward runs in bf16 where the device computes it
natively (CUDA with bf16, CPUs with AMX or AVX512-BF16), else fp32; features are stored in
fp32 either way. A bf16 forward runs on a copy of the backbone with its BatchNorm layers
folded into the convolutions before them (common/folding.py: one pass over the activations
fewer per layer); an fp32 one on the backbone as it is, so its features are the model's to
the bit.

Cache key: sha256 of the backbone's tensors, the model name, the preprocessing, views, crop
scale, seed, extraction precision, the fold, channels-last and device type, and each image's
identity (path, size, mtime; or the dataset's fingerprint): a changed image, model, weights file,
transform or numeric setting never reuses stale features. Whether the cache hits is decided
together: every process reports whether it sees the file and it is a hit only if all do, so
processes never disagree (separate home folders per node, a concurrent writer) and hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import tempfile
import time
from typing import Iterator, TYPE_CHECKING

import torch
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from common import mmap_tensors
from common.data import ImageDataset, train_order, training_transforms
from common.errors import UserError
from common.files import STALE_AFTER, remove_stale_temporaries
from common.folding import fold_batchnorm
from common.imagecheck import identity_digest
from common.images import decode_sizes
from common.labels import labels_of
from common.log import logger
from common.models import in_heads
from common.hardware import cpu_has_native_bf16, gpu_has_native_bf16
from common.memory import HeapGuard


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig
    from common.models import Network
    import datasets

FORMAT = 2


class FeatureDataset(torch.utils.data.Dataset):
    """Cached features [N, views, dim] served like images: epoch e reads view e mod views."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels
        self.epoch = mp.Value("i", 0, lock=False)  # set by common.data.set_epoch

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        v = self.epoch.value % self.features.shape[1]
        return {"pixel_values": self.features[i, v], "labels": int(self.labels[i]), "index": i}


class FeatureHeads(nn.Module):
    """The model's own head modules on cached features: head k reads its slice of the
    feature vector; their outputs are averaged (one head: just that head)."""

    def __init__(self, heads, dims):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.dims = list(dims)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outs = [h(f) for h, f in zip(self.heads, features.split(self.dims, dim=-1))]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)


@contextlib.contextmanager
def head_inputs(model: nn.Module, head_names: tuple) -> Iterator[list]:
    """While active, `captured` holds what each head received in the last forward."""
    captured = [None] * len(head_names)

    def hook(k):
        def capture(module, args):
            captured[k] = args[0].flatten(1)
        return capture

    handles = [model.get_submodule(h).register_forward_pre_hook(hook(k))
               for k, h in enumerate(head_names)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def extract_precision(cfg: TrainConfig, device: torch.device) -> str:
    """'bf16' or 'fp32' for the frozen backbone's forward (--extract-precision auto: bf16
    where the device has it natively, where it is ~2x faster than fp32)."""
    if cfg.extract_precision != "auto":
        return cfg.extract_precision
    if device.type == "cuda":  # Ampere or newer (a T4/V100 only emulates bf16)
        return "bf16" if gpu_has_native_bf16(device) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def cache_key(model: nn.Module, head_names: tuple, cfg: TrainConfig, preprocessing: dict,
              digests: tuple, *, settings: dict) -> str:
    """The cache entry's name: a hash of everything the features depend on."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(model=cfg.model, preprocessing=preprocessing,
                             views=cfg.feature_views, crop_scale=cfg.train_crop_scale,
                             augment=cfg.augment, random_erasing=cfg.random_erasing,
                             seed=cfg.seed, format=FORMAT, **settings),
                        sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if not in_heads(name, head_names):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for digest in digests:  # the images of train and val (common/imagecheck.py)
        h.update(digest.encode())
    return h.hexdigest()[:32]


def _autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def _probe(model, head_names, example):
    """(feature dims of each head) from one image in fp32, checking that the heads applied
    to the captured inputs and averaged reproduce the model's output: what training on
    cached features assumes."""
    with head_inputs(model, head_names) as captured:
        out = model(example).float()
    dims = [c.shape[1] for c in captured]
    heads = FeatureHeads([model.get_submodule(h) for h in head_names], dims)
    again = heads(torch.cat(captured, dim=1)).float()
    if again.shape != out.shape or not torch.allclose(again, out, rtol=1e-3, atol=1e-4):
        raise UserError(f"this model's output is not its classifier heads "
                        f"({', '.join(head_names)}) applied to their inputs, so cached features "
                        "cannot reproduce it; pass --no-cache-features")
    return dims


@torch.no_grad()
def _extract(accelerator, model, head_names, dataset, views, cfg, workers, channels_last,
             precision, rows):
    """Features of `dataset` for each view, written by this machine's main process into
    `rows` ([N, views, dim] memmap; None elsewhere). Batches go to the model's device."""
    device = accelerator.device
    guard = HeapGuard(device)  # bounds RSS creep over many batches on CPU
    if len(dataset) >= 10000:
        # decode in a worker process: the training process then never maps the whole image
        # column (memory-mapped Arrow pages count in its resident memory)
        workers = max(workers, 1)
    for v in range(views):
        dataset.epoch.value = v  # view v = the augmentation of epoch v
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                             num_workers=workers, shuffle=False,
                                             collate_fn=dataset.collate(channels_last))
        loader = prepare_data_loader(loader, device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index,
                                     put_on_device=True)
        for batch in loader:
            guard()
            x = batch["pixel_values"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with head_inputs(model, head_names) as captured, _autocast(device, precision):
                model(x)
            f = torch.cat(captured, dim=1).float()
            # exact: the padding of the last batch is dropped; rows land at their index
            f, index = accelerator.gather_for_metrics((f, batch["index"]))
            if rows is not None:
                rows[index.cpu().numpy(), v] = f.cpu().numpy()


def _cache_dir(cfg):
    return cfg.feature_cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "transfer-learning", "features")


def _remove_stale_extractions(cache_dir: str) -> None:
    """The temporary files of extractions that were killed (GBs at scale): those already
    there and untouched for STALE_AFTER seconds (a running extraction writes its file
    continuously; another job's, on this machine, is left alone)."""
    removed = remove_stale_temporaries(cache_dir, time.time(), idle=STALE_AFTER)
    if removed:
        logger.info(f"features: removed {len(removed)} temporary file(s) of interrupted "
                    f"extractions from {cache_dir}")


def feature_datasets(train: datasets.Dataset, val: datasets.Dataset, preprocessing: dict,
                     cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train images, val images) as the backbone sees them for the cache: --feature-views
    augmented views of each training image (0: its centre view), one centre view of each
    val image."""
    # at the input size: a head trained on them is evaluated there (the fine-tune's
    # --train-size is for its own training steps)
    train_tf, eval_tf = training_transforms(preprocessing, cfg, for_features=True)
    train_side, eval_side = decode_sizes(preprocessing, cfg)
    train_images = (ImageDataset(train, train_tf, seed=cfg.seed, views=cfg.feature_views,
                                 min_side=train_side)
                    if cfg.feature_views else ImageDataset(train, eval_tf, min_side=eval_side))
    return train_images, ImageDataset(val, eval_tf, min_side=eval_side)


def cached_feature_loaders(accelerator: Accelerator, cfg: TrainConfig, network: Network,
                           train: datasets.Dataset, val: datasets.Dataset, *,
                           workers: int) -> tuple:
    """(FeatureHeads to train, train loader, val loader, train images, val images, info)
    over cached features of `network` (a models.Network); extracts them first when the cache
    has no entry for this exact model, data, transform and precision."""
    model, head_names = network.model, network.head_names
    preprocessing, channels_last = network.preprocessing, network.channels_last
    train_images, val_images = feature_datasets(train, val, preprocessing, cfg)
    views = max(cfg.feature_views, 1)
    device = accelerator.device
    precision = extract_precision(cfg, device)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    example = val_images[0]["pixel_values"][None].to(device)
    dims = _probe(model, head_names, example)
    # bf16: the features are bf16's rounding of the backbone's anyway, and the fold's rounding
    # is of the same order (benchmarks/README.md, issue 33, run 8); fp32 keeps the model's own
    backbone = fold_batchnorm(model, example) if precision == "bf16" else model
    folded = backbone is not model
    cache_dir = _cache_dir(cfg)
    key = [None]
    if accelerator.is_main_process:  # hashing weights and stat-ing every image: once
        key[0] = cache_key(model, head_names, cfg, preprocessing,
                           (identity_digest(train), identity_digest(val)),
                           settings=dict(precision=precision, channels_last=channels_last,
                                         device=device.type,
                                         batchnorm_folded=folded))
    if accelerator.num_processes > 1:
        broadcast_object_list(key)
    path = os.path.join(cache_dir, key[0] + ".safetensors")
    seen = gather_object([os.path.isfile(path)]) if accelerator.num_processes > 1 \
        else [os.path.isfile(path)]
    info = dict(feature_cache=path, extract_precision=precision,
                batchnorm_folded=folded)
    if all(seen):
        logger.info(f"features: cached in {path}")
        info["features_cached"] = True
    else:
        t0 = time.time()
        shapes = {"train": (len(train_images), views, sum(dims)),
                  "val": (len(val_images), 1, sum(dims))}
        tmp, maps = None, {"train": None, "val": None}
        if accelerator.is_local_main_process:  # one writer per machine (shared or not)
            os.makedirs(cache_dir, exist_ok=True)
            _remove_stale_extractions(cache_dir)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=cache_dir)
            os.close(fd)
            maps = mmap_tensors.create(tmp, shapes)
        _extract(accelerator, backbone, head_names, train_images, views, cfg, workers,
                 channels_last, precision, maps["train"])
        _extract(accelerator, backbone, head_names, val_images, 1, cfg, workers, channels_last,
                 precision, maps["val"])
        if tmp:
            for m in maps.values():
                m.flush()
            del maps
            os.replace(tmp, path)  # never a half-written cache entry
        accelerator.wait_for_everyone()
        seconds = time.time() - t0
        n = shapes["train"][0] * views + shapes["val"][0]
        logger.info(f"features: {shapes['train']} train, {shapes['val']} val in "
                    f"{seconds:.1f} s ({n / seconds:.0f} img/s, {precision}) -> {path}")
        info.update(features_cached=False, extract_seconds=round(seconds, 2),
                    extract_images_per_second=round(n / seconds, 1))
    cached = mmap_tensors.open_read(path)
    heads = FeatureHeads([model.get_submodule(h) for h in head_names], dims)
    loader_args = dict(batch_size=cfg.batch_size, num_workers=0,
                       generator=torch.Generator().manual_seed(cfg.seed))
    train_labels = torch.tensor(labels_of(train))
    train_loader = torch.utils.data.DataLoader(
        FeatureDataset(cached["train"], train_labels), **train_order(cfg, train_labels),
        **loader_args)
    val_loader = torch.utils.data.DataLoader(
        FeatureDataset(cached["val"], torch.tensor(labels_of(val))), shuffle=False, **loader_args)
    return heads, train_loader, val_loader, train_images, val_images, info
