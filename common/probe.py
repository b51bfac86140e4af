"""The linear probe before fine-tuning (LP-FT, Kumar et al. 2022).

Fine-tuning a pretrained backbone under a random new head sends large, noisy gradients into
the pretrained layers while the head finds its feet, and distorts the features that made
them worth transferring. LP-FT first trains the head alone on the frozen backbone, to
convergence, then fine-tunes every layer from there. Here the first stage is exactly what
train_extractor.py does by default (the same cached features, the same optimiser, schedule
and data order), so it costs one forward pass over the data plus seconds, and the cache is
shared with extractor runs of the same model and data. The fine-tune then evaluates the
probed model as epoch 0: it can only be kept or improved on.

Every process computes the same probe from the same cached features (no data is sharded,
nothing to synchronise); DDP, built afterwards, starts from rank 0's weights anyway.
"""

import dataclasses
import math
import time

import torch
from accelerate.data_loader import SeedableRandomSampler

from common.data import BalancedSampler
from common.engine import make_loss
from common.features import cached_feature_loaders
from common.optim import build_optimizer, build_scheduler


def _order(cfg, labels, epoch):
    """The extractor's data order on one process: Accelerate's seedable sampler (seed +
    epoch), or the balanced sampler."""
    if cfg.sampler == "balanced":
        sampler = BalancedSampler(labels, cfg.seed)
    else:
        sampler = SeedableRandomSampler(range(len(labels)), data_seed=cfg.seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def linear_probe(accelerator, cfg, built, train, val, workers, channels_last, class_weights):
    """Train `built`'s new heads on cached features of its frozen backbone for
    cfg.probe_epochs epochs (lr cfg.probe_lr, SGD, cosine, as the extractor); returns a dict
    of figures for results.json. The heads are trained in place."""
    t0 = time.time()
    heads, train_loader, _, _, _, info = cached_feature_loaders(
        accelerator, cfg, built.model, built.head_names, train, val, built.preprocessing,
        workers, channels_last)
    features, labels = train_loader.dataset.features, train_loader.dataset.labels
    probe_cfg = dataclasses.replace(cfg, lr=cfg.probe_lr, epochs=cfg.probe_epochs,
                                    scheduler="cosine", warmup_epochs=0.0, optimizer="sgd",
                                    layer_decay=None, backbone_lr_mult=1.0)
    device = accelerator.device
    heads.to(device).train()
    optimizer = build_optimizer(probe_cfg, heads)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    scheduler = build_scheduler(probe_cfg, optimizer, steps_per_epoch)
    loss_fn = make_loss(0.0, class_weights)  # the extractor's default objective
    correct = 0
    for epoch in range(cfg.probe_epochs):
        order = _order(cfg, labels, epoch)
        view = epoch % features.shape[1]
        correct = 0
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.tensor(order[start:start + cfg.batch_size])
            x = features[idx, view].to(device)
            y = labels[idx].to(device)
            logits = heads(x)
            loss_fn(logits.float(), y).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            correct += (logits.argmax(-1) == y).sum()
    heads.to("cpu")
    accuracy = float(correct) / len(labels) if cfg.probe_epochs else 0.0
    seconds = time.time() - t0
    accelerator.print(f"linear probe: {cfg.probe_epochs} epochs on cached features, train "
                      f"accuracy {accuracy:.4f} in the last, {seconds:.1f} s with the "
                      "extraction; every layer trains from here")
    return dict(info, probe_seconds=round(seconds, 2), probe_train_accuracy=accuracy)
