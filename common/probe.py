"""The linear probe before fine-tuning (LP-FT, Kumar et al. 2022).

Fine-tuning a pretrained backbone under a random new head sends large, noisy gradients into
the pretrained layers while the head finds its feet, and distorts the features that made
them worth transferring. LP-FT first trains the head alone on the frozen backbone, to
convergence, then fine-tunes every layer from there. Here the first stage is exactly what
train_extractor.py does by default at the same --image-size (the same cached features, the
same optimiser, schedule and data order), so it costs one forward pass over the data plus
seconds, and the cache is shared with extractor runs of the same model and data. The fine-tune then evaluates the
probed model as epoch 0: it can only be kept or improved on.

Every process computes the same probe from the same cached features (no data is sharded,
nothing to synchronise); DDP, built afterwards, starts from rank 0's weights anyway.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, TYPE_CHECKING

import torch
from accelerate.data_loader import SeedableRandomSampler

from common.data import BalancedSampler
from common.checkpoint import TrainState
from common.engine import evaluate, make_loss, train_epoch
from common.features import cached_feature_loaders
from common.log import logger
from common.metrics import load_metrics, score
from common.models import Network, in_heads
from common.optim import build_optimizer, build_scheduler


if TYPE_CHECKING:  # names for the type hints only
    from accelerate import Accelerator
    from common.config import TrainConfig
    import datasets


@dataclasses.dataclass
class Probe:
    """What the linear probe leaves for the fine-tune."""

    figures: dict                        # for results.json (probe_* and the feature cache's)
    fresh_heads: Optional[dict] = None   # --finetune-from random: the heads as built, which
    #                                      every layer then trains from after epoch 0
    val_metrics: Optional[dict] = None   # the probed model's val metrics, where those on the
    #                                      cached features are its metrics on the val images


def _order(cfg, labels, epoch):
    """The extractor's data order on one process: Accelerate's seedable sampler (seed +
    epoch), or the balanced sampler."""
    if cfg.sampler == "balanced":
        sampler = BalancedSampler(labels, cfg.seed)
    else:
        sampler = SeedableRandomSampler(range(len(labels)), data_seed=cfg.seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def linear_probe(accelerator: Accelerator, cfg: TrainConfig, network: Network,
                 train: datasets.Dataset, val: datasets.Dataset, *, workers: int,
                 class_weights: Optional[list], class_names: list) -> Probe:
    """Train `network`'s new heads on cached features of its frozen backbone for
    cfg.probe_epochs epochs (lr cfg.probe_lr, SGD, cosine, as the extractor), through the
    same step and evaluation as every run; the heads are trained in place, to the best
    epoch's by --select-metric on val."""
    t0 = time.time()
    fresh = None
    if cfg.finetune_from == "random":  # the heads as built, before the probe trains them
        fresh = {k: v.detach().clone() for k, v in network.model.state_dict().items()
                 if in_heads(k, network.head_names)}
    heads, train_loader, val_loader, _, _, info = cached_feature_loaders(
        accelerator, cfg, network, train, val, workers=workers)
    dataset, labels = train_loader.dataset, train_loader.dataset.labels
    # every process trains the whole probe alike (nothing sharded, nothing to synchronise)
    val_loader = torch.utils.data.DataLoader(val_loader.dataset, batch_size=1024)
    # the extractor's defaults, whatever the fine-tune's optimiser flags say: epoch 0 is then
    # exactly train_extractor.py's model (--weight-decay 0.05 leaked in here once)
    probe_cfg = dataclasses.replace(cfg, lr=cfg.probe_lr, epochs=cfg.probe_epochs,
                                    scheduler="cosine", warmup_epochs=0.0, optimizer="sgd",
                                    momentum=0.9, weight_decay=0.0, layer_decay=None,
                                    backbone_lr_mult=1.0)
    heads.to(accelerator.device)
    optimizer = build_optimizer(probe_cfg, heads)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    scheduler = build_scheduler(probe_cfg, optimizer, steps_per_epoch)
    loss_fn = make_loss(0.0, class_weights)  # the extractor's default objective
    metrics = load_metrics(accelerator)
    state, best = TrainState(), None
    for epoch in range(cfg.probe_epochs):
        state.epoch, state.batches_done = epoch, 0
        dataset.epoch.value = epoch  # epoch e reads feature view e mod views
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size,
                                             sampler=_order(cfg, labels, epoch))
        heads.train()
        for _ in train_epoch(heads, loader, optimizer, scheduler, state, loss_fn=loss_fn):
            pass
        # keep the best epoch's head, chosen as the extractor chooses (--select-metric on val)
        m = evaluate(heads, val_loader, metrics, class_names)
        if best is None or score(m, cfg.select_metric) > best[0]:
            best = (score(m, cfg.select_metric), epoch + 1,
                    {k: v.detach().clone() for k, v in heads.state_dict().items()}, m)
    if best is not None:
        heads.load_state_dict(best[2])
    heads.train().to("cpu")
    seconds = time.time() - t0
    logger.info(f"linear probe: {cfg.probe_epochs} epochs on cached features in "
                f"{seconds:.1f} s with the extraction; the head of epoch {best[1]} (val "
                f"accuracy {best[3]['accuracy']:.4f} on features) is epoch 0's model"
                + ("; every layer fine-tunes from it" if cfg.finetune_from == "probe"
                   else "; every layer fine-tunes from a fresh head (--finetune-from "
                        "random)"))
    # Epoch 0 is the probed model. Its val features are what its backbone computes on the
    # val images through the evaluation's transform; in fp32 (no --mixed_precision, fp32
    # features) and without --tta, the heads applied to them are its evaluation, so the
    # fine-tune takes these metrics instead of running the backbone over val again
    reuse = (info["extract_precision"] == "fp32" and accelerator.mixed_precision == "no"
             and not cfg.tta)
    return Probe(figures=dict(info, probe_seconds=round(seconds, 2), probe_best_epoch=best[1],
                              probe_val_accuracy=best[3]["accuracy"]),
                 fresh_heads=fresh, val_metrics=best[3] if reuse else None)
