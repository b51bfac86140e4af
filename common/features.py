"""Extractor fast path: the frozen backbone's features, computed once, cached, reused.

A frozen backbone in eval mode is a fixed function, so recomputing it on every image in every
epoch (as the tutorial does) is wasted work. Here each image goes through the backbone once
per view: the extraction is sharded across processes and gathered exactly
(`gather_for_metrics`, sorted back to dataset order), every rank holds the same features, and
the main process stores them in a cache file keyed by everything that determines them. The
head then trains on the cached vectors in milliseconds per epoch, with the same loop, sampler
and seeds as the on-the-fly path, and the exported model is the backbone with that head.

Views (`--feature-views K`): 0 caches one un-augmented centre view per training image (a
linear probe); K >= 1 caches K augmented views (view v = the augmentation of epoch v) and
epoch e trains on view e mod K. Validation always has one centre view.

Cache key: sha256 of the backbone's tensors, the model name, the preprocessing, the views,
crop scale and seed, and each image's path, size and mtime (or the Hub dataset fingerprint):
a changed image, model, weights file or transform never reuses stale features.
"""

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import tempfile
import time

import datasets
import torch
from accelerate.data_loader import prepare_data_loader
from safetensors.torch import load_file, save_file
from torch import nn

from common.data import ImageDataset, build_transforms


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


@contextlib.contextmanager
def headless(model, head_name):
    """The model with its head replaced by Identity: it outputs the pooled features."""
    parent_name, _, child = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    try:
        yield model
    finally:
        setattr(parent, child, head)


def _image_identity(split):
    """Per-image identity for the cache key: path + size + mtime for files on disk, the
    Arrow fingerprint for images stored in the dataset itself."""
    raw = split.cast_column("image", datasets.Image(decode=False))["image"]
    out = []
    for src in raw:
        if src.get("bytes") is not None:
            return [split._fingerprint]
        st = os.stat(src["path"])
        out.append(f"{os.path.abspath(src['path'])}|{st.st_size}|{st.st_mtime_ns}")
    return out


def cache_key(model, head_name, cfg, preprocessing, train, val):
    h = hashlib.sha256()
    h.update(json.dumps(dict(model=cfg.model, preprocessing=preprocessing,
                             views=cfg.feature_views, crop_scale=cfg.train_crop_scale,
                             seed=cfg.seed, format=1), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        if not name.startswith(head_name + "."):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    for split in (train, val):
        h.update("\n".join(_image_identity(split)).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def _extract(accelerator, model, dataset, views, cfg, workers, channels_last):
    """[N, views, dim] features of `dataset` (an ImageDataset), every rank the same."""
    out = []
    for v in range(views):
        dataset.epoch.value = v  # view v = the augmentation of epoch v
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                             num_workers=workers, shuffle=False)
        loader = prepare_data_loader(loader, accelerator.device,
                                     num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index)
        parts = []
        for batch in loader:
            x = batch["pixel_values"]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.autocast():
                f = model(x).float()
            parts.append([t.cpu() for t in accelerator.gather_for_metrics((f, batch["index"]))])
        feats = torch.cat([p[0] for p in parts])
        index = torch.cat([p[1] for p in parts])
        out.append(feats[index.argsort()])
    return torch.stack(out, dim=1)


def cached_feature_loaders(accelerator, cfg, model, head_name, train, val, preprocessing,
                           workers, channels_last):
    """(train_loader, val_loader, train_images) over cached features; extracts them first
    when the cache has no entry for this exact model, data and transform."""
    train_tf, eval_tf = build_transforms(preprocessing, cfg.train_crop_scale)
    views = max(cfg.feature_views, 1)
    train_images = (ImageDataset(train, train_tf, seed=cfg.seed) if cfg.feature_views
                    else ImageDataset(train, eval_tf))
    val_images = ImageDataset(val, eval_tf)
    cache_dir = cfg.feature_cache_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")),
        "transfer-learning", "features")
    path = os.path.join(cache_dir, cache_key(model, head_name, cfg, preprocessing, train, val)
                        + ".safetensors")
    if os.path.isfile(path):
        cached = load_file(path)
        accelerator.print(f"features: cached in {path}")
    else:
        t0 = time.time()
        model = model.to(accelerator.device).eval()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        with headless(model, head_name) as backbone:
            cached = {"train": _extract(accelerator, backbone, train_images, views, cfg,
                                        workers, channels_last),
                      "val": _extract(accelerator, backbone, val_images, 1, cfg, workers,
                                      channels_last)}
        if accelerator.is_main_process:
            os.makedirs(cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=cache_dir)
            os.close(fd)
            save_file(cached, tmp)
            os.replace(tmp, path)  # never a half-written cache entry
        n = cached["train"].shape[0] * views + cached["val"].shape[0]
        seconds = time.time() - t0
        accelerator.print(f"features: {tuple(cached['train'].shape)} train, "
                          f"{tuple(cached['val'].shape)} val in {seconds:.1f} s "
                          f"({n / seconds:.0f} img/s) -> {path}")
    loader_args = dict(batch_size=cfg.batch_size, num_workers=0,
                       generator=torch.Generator().manual_seed(cfg.seed))
    train_loader = torch.utils.data.DataLoader(
        FeatureDataset(cached["train"], torch.tensor(train["label"])), shuffle=True,
        **loader_args)
    val_loader = torch.utils.data.DataLoader(
        FeatureDataset(cached["val"], torch.tensor(val["label"])), shuffle=False, **loader_args)
    return train_loader, val_loader, train_images, val_images
