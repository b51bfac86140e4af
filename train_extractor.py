"""Train only a new head on a frozen ImageNet-pretrained backbone (feature extraction).

The backbone's parameters AND its BatchNorm running statistics stay exactly as pretrained.
By default its features are computed once (sharded over processes), cached, and the head
trains on them (--no-cache-features: the tutorial's way, the backbone runs every epoch in
eval mode). Runs wherever Accelerate runs:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_extractor.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train_extractor.py \\
        --data-dir DIR --model timm:tf_efficientnet_lite0 --weights lite0.safetensors
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 --feature-views 1
--no-cache-features. Writes config.yaml, metrics.jsonl, results.json and best/ to --output-dir.
"""

import time

from common.config import ExtractorConfig, parse_config
from common.data import build_dataloaders, load_data, num_workers
from common.engine import fit
from common.errors import cli
from common.features import cached_feature_loaders
from common.models import build_model, freeze_backbone
from common.optim import build_optimizer
from common.runtime import setup_run, use_channels_last


@cli
def main(argv=None):
    started = time.time()
    cfg = parse_config(ExtractorConfig, __doc__, argv)
    accelerator, output_dir = setup_run(cfg, "extractor")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    model, head_name, preprocessing = build_model(cfg.model, len(class_names),
                                                  cfg.pretrained, cfg.weights)
    freeze_backbone(model, head_name)  # requires_grad only on the head
    head = model.get_submodule(head_name)
    channels_last = use_channels_last(cfg, accelerator)
    run = dict(started=started, script="extractor", class_names=class_names,
               preprocessing=preprocessing, train_samples=len(train_ds), val_samples=len(val_ds))
    if cfg.cache_features:
        train_loader, val_loader, train_images, val_images = cached_feature_loaders(
            accelerator, cfg, model, head_name, train_ds, val_ds, preprocessing,
            num_workers(cfg, accelerator.num_processes), channels_last)
        # the head alone trains, on feature vectors; the export is the whole model
        run.update(head_name="", frozen_backbone=False, channels_last=False,
                   export_model=model, train_images=train_images, val_images=val_images)
        trained = head
    else:
        train_loader, val_loader = build_dataloaders(train_ds, val_ds, preprocessing, cfg,
                                                     accelerator.num_processes,
                                                     augment=cfg.feature_views != 0)
        run.update(head_name=head_name, frozen_backbone=True, channels_last=channels_last)
        trained = model
    optimizer = build_optimizer(cfg, head)
    return fit(accelerator, cfg, trained, optimizer, train_loader, val_loader, run, output_dir)


if __name__ == "__main__":
    main()
