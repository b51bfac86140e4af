"""Fine-tune an ImageNet-pretrained backbone on a small image dataset: new head, every layer trained.

Runs on CPU, one GPU, several GPUs or machines, in fp32/bf16/fp16, through Accelerate:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_finetune.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/multi_gpu_bf16.yaml train_finetune.py \\
        --data-dir DIR --model timm:convnext_tiny
Strategies: --freeze-epochs N (head only first, then every layer), --backbone-lr-mult F and
--layer-decay D (lower learning rates for pretrained and earlier layers), --scheduler
step|cosine|onecycle|constant with --warmup-epochs, --label-smoothing, --optimizer sgd|adamw
with --weight-decay (not on biases and norm weights), --find-lr / --lr auto (LR range test).
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 --freeze-epochs 0
--backbone-lr-mult 1 --label-smoothing 0 (SGD, momentum 0.9, StepLR 7/0.1).
Writes config.yaml, metrics.jsonl, results.json and best/ to --output-dir.
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
    if 0 < cfg.epochs <= cfg.freeze_epochs:
        accelerator.print(f"warning: --epochs {cfg.epochs} <= --freeze-epochs "
                          f"{cfg.freeze_epochs}: only the head trains; pass --freeze-epochs 0 "
                          "(or more --epochs) to train every layer")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    model, head_name, preprocessing = build_model(cfg.model, len(class_names),
                                                  cfg.pretrained, cfg.weights)
    train_loader, val_loader = build_dataloaders(train_ds, val_ds, preprocessing, cfg,
                                                 accelerator.num_processes)
    # every layer is in the optimiser from the start, even while --freeze-epochs holds the
    # backbone: frozen parameters get no gradient and are left alone until unfrozen
    optimizer = build_optimizer(cfg, model, head_name)
    channels_last = use_channels_last(cfg, accelerator)
    run = dict(started=started, script="finetune", head_name=head_name, frozen_backbone=False,
               freeze_epochs=cfg.freeze_epochs, class_names=class_names,
               preprocessing=preprocessing, channels_last=channels_last,
               train_samples=len(train_ds), val_samples=len(val_ds))
    return fit(accelerator, cfg, model, optimizer, train_loader, val_loader, run, output_dir)


if __name__ == "__main__":
    main()
