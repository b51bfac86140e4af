"""Fine-tune an ImageNet-pretrained backbone on a small image dataset: new head, every layer trained.

Runs on CPU, one GPU, several GPUs or machines, in fp32/bf16/fp16, through Accelerate:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_finetune.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/multi_gpu_bf16.yaml train_finetune.py \\
        --data-dir DIR --model timm:convnext_tiny
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 (SGD, momentum 0.9,
StepLR 7/0.1). Writes config.yaml, metrics.jsonl, results.json and best/ to --output-dir.
"""

import time

from common.config import FinetuneConfig, parse_config
from common.data import build_dataloaders, load_data
from common.engine import fit
from common.errors import cli
from common.models import build_model
from common.optim import build_optimizer
from common.runtime import setup_run, use_channels_last


@cli
def main(argv=None):
    started = time.time()
    cfg = parse_config(FinetuneConfig, __doc__, argv)
    accelerator, output_dir = setup_run(cfg, "finetune")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    model, head_name, preprocessing = build_model(cfg.model, len(class_names),
                                                  cfg.pretrained, cfg.weights)
    train_loader, val_loader = build_dataloaders(train_ds, val_ds, preprocessing, cfg,
                                                 accelerator.num_processes)
    optimizer = build_optimizer(cfg, model.parameters())  # all layers learn
    channels_last = use_channels_last(cfg, accelerator)
    run = dict(started=started, script="finetune", head_name=head_name, frozen_backbone=False,
               class_names=class_names, preprocessing=preprocessing,
               channels_last=channels_last, train_samples=len(train_ds), val_samples=len(val_ds))
    return fit(accelerator, cfg, model, optimizer, train_loader, val_loader, run, output_dir)


if __name__ == "__main__":
    main()
