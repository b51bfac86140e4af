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

STARTED = time.time()  # before the imports (torch, timm, datasets: seconds): wall time counts them

from common.config import FinetuneConfig, parse_config  # noqa: E402
from common.data import build_dataloaders, load_data  # noqa: E402
from common.engine import make_loss  # noqa: E402
from common.errors import cli  # noqa: E402
from common.models import build_model  # noqa: E402
from common.optim import build_optimizer  # noqa: E402
from common.runtime import Run, setup_run, use_channels_last  # noqa: E402
from common.trainer import fit  # noqa: E402


@cli
def main(argv=None):
    cfg = parse_config(FinetuneConfig, __doc__, argv)
    accelerator, output_dir = setup_run(cfg, "finetune")
    if 0 < cfg.epochs <= cfg.freeze_epochs:
        accelerator.print(f"warning: --epochs {cfg.epochs} <= --freeze-epochs "
                          f"{cfg.freeze_epochs}: only the head trains; pass --freeze-epochs 0 "
                          "(or more --epochs) to train every layer")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    built = build_model(cfg.model, len(class_names), cfg.pretrained, cfg.weights)
    train_loader, val_loader = build_dataloaders(train_ds, val_ds, built.preprocessing, cfg,
                                                 accelerator.num_processes)
    # every layer is in the optimiser from the start, even while --freeze-epochs holds the
    # backbone: frozen parameters get no gradient and are left alone until unfrozen
    optimizer = build_optimizer(cfg, built.model, built.head_names)
    run = Run(script="finetune", trained=built.model, export=built.model,
              head_names=built.head_names, model_heads=built.head_names,
              class_names=class_names, preprocessing=built.preprocessing,
              channels_last=use_channels_last(cfg, accelerator),
              train_images=train_loader.dataset, val_images=val_loader.dataset,
              loss=make_loss(cfg.label_smoothing), started=STARTED,
              freeze_epochs=cfg.freeze_epochs)
    return fit(accelerator, cfg, run, optimizer, train_loader, val_loader, output_dir)


if __name__ == "__main__":
    main()
