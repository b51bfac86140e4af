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
from common.metrics import score
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
    heads, train_loader, val_loader, _, _, info = cached_feature_loaders(
        accelerator, cfg, built.model, built.head_names, train, val, built.preprocessing,
        workers, channels_last)
    features, labels = train_loader.dataset.features, train_loader.dataset.labels
    val_x, val_y = val_loader.dataset.features[:, 0], val_loader.dataset.labels
    # the extractor's defaults, whatever the fine-tune's optimiser flags say: epoch 0 is then
    # exactly train_extractor.py's model (--weight-decay 0.05 leaked in here once)
    probe_cfg = dataclasses.replace(cfg, lr=cfg.probe_lr, epochs=cfg.probe_epochs,
                                    scheduler="cosine", warmup_epochs=0.0, optimizer="sgd",
                                    momentum=0.9, weight_decay=0.0, layer_decay=None,
                                    backbone_lr_mult=1.0)
    device = accelerator.device
    heads.to(device).train()
    optimizer = build_optimizer(probe_cfg, heads)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    scheduler = build_scheduler(probe_cfg, optimizer, steps_per_epoch)
    loss_fn = make_loss(0.0, class_weights)  # the extractor's default objective
    best = None
    for epoch in range(cfg.probe_epochs):
        order = _order(cfg, labels, epoch)
        view = epoch % features.shape[1]
        for start in range(0, len(order), cfg.batch_size):
            idx = torch.tensor(order[start:start + cfg.batch_size])
            x = features[idx, view].to(device)
            y = labels[idx].to(device)
            logits = heads(x)
            loss_fn(logits.float(), y).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        # keep the best epoch's head, chosen as the extractor chooses (--select-metric on val)
        m = _val_metrics(heads, val_x, val_y, device, logits.shape[-1])
        if best is None or score(m, cfg.select_metric) > best[0]:
            best = (score(m, cfg.select_metric), epoch + 1, m["accuracy"],
                    {k: v.detach().clone() for k, v in heads.state_dict().items()})
    if best is not None:
        heads.load_state_dict(best[3])
    heads.to("cpu")
    seconds = time.time() - t0
    accelerator.print(f"linear probe: {cfg.probe_epochs} epochs on cached features in "
                      f"{seconds:.1f} s with the extraction; the head of epoch {best[1]} (val "
                      f"accuracy {best[2]:.4f} on features) is epoch 0's model"
                      + ("; every layer fine-tunes from it" if cfg.finetune_from == "probe"
                         else "; every layer fine-tunes from a fresh head (--finetune-from "
                              "random)"))
    return dict(info, probe_seconds=round(seconds, 2), probe_best_epoch=best[1],
                probe_val_accuracy=best[2])


@torch.no_grad()
def _val_metrics(heads, x, y, device, num_classes):
    """accuracy, loss, balanced accuracy and macro-F1 of the heads on the cached val
    features (what --select-metric may ask for)."""
    heads.eval()
    logits = torch.cat([heads(x[i:i + 1024].to(device)).float().cpu()
                        for i in range(0, len(x), 1024)])
    heads.train()
    pred = logits.argmax(-1)
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    cm.index_put_((y, pred), torch.ones(len(y), dtype=torch.float64), accumulate=True)
    tp, predicted, actual = cm.diag(), cm.sum(0), cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall /
                     (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    return dict(accuracy=(pred == y).double().mean().item(),
                loss=torch.nn.functional.cross_entropy(logits, y).item(),
                balanced_accuracy=recall.mean().item(), macro_f1=f1.mean().item())
