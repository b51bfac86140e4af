"""Train only a new head on a frozen ImageNet-pretrained backbone (feature extraction).

The backbone's parameters AND its BatchNorm running statistics stay exactly as pretrained:
it is kept in eval mode while the head trains. Runs wherever Accelerate runs:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_extractor.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train_extractor.py \\
        --data-dir DIR --model timm:tf_efficientnet_lite0 --weights lite0.safetensors
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 (SGD, momentum 0.9,
StepLR 7/0.1). Writes config.yaml, metrics.jsonl, results.json and best/ to --output-dir.
"""

from common.config import ExtractorConfig, parse_config
from common.data import build_dataloaders, load_data
from common.engine import fit
from common.errors import cli
from common.models import build_model, freeze_backbone
from common.optim import build_optimizer
from common.runtime import setup_run, use_channels_last


@cli
def main(argv=None):
    cfg = parse_config(ExtractorConfig, __doc__, argv)
    accelerator, output_dir = setup_run(cfg, "extractor")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    model, head_name, preprocessing = build_model(cfg.model, len(class_names),
                                                  cfg.pretrained, cfg.weights)
    freeze_backbone(model, head_name)  # requires_grad only on the head
    train_loader, val_loader = build_dataloaders(train_ds, val_ds, preprocessing, cfg,
                                                 accelerator.num_processes)
    optimizer = build_optimizer(cfg, model.get_submodule(head_name).parameters())
    channels_last = use_channels_last(cfg, accelerator)
    run = dict(script="extractor", head_name=head_name, frozen_backbone=True,
               class_names=class_names, preprocessing=preprocessing,
               channels_last=channels_last, train_samples=len(train_ds), val_samples=len(val_ds))
    return fit(accelerator, cfg, model, optimizer, train_loader, val_loader, run, output_dir)


if __name__ == "__main__":
    main()
