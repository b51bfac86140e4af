"""Fine-tune an ImageNet-pretrained backbone on a small image dataset: new head, every layer.

Runs on CPU, one GPU, several GPUs or machines, in fp32/bf16/fp16, through Accelerate:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_finetune.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/multi_gpu_bf16.yaml train_finetune.py \\
        --data-dir DIR --model timm:convnext_tiny
By default: a linear probe first (--probe-epochs: a new head trained on cached features of the
frozen backbone, evaluated as epoch 0: the extractor's accuracy as a floor), then every layer
from a fresh head at one learning rate (AdamW, lr 0.001, weight decay 0.05; --optimizer sgd:
lr 0.01, momentum 0.9), BatchNorm statistics updated, for a budget of optimiser
steps (--epochs auto, --budget-steps), annealed to the end; the best epoch by --select-metric
(epoch 0 included) is kept.
Strategies: --finetune-from probe (LP-FT: every layer from the probe's head), --freeze-epochs N
(head only on the fly), --backbone-lr-mult F and --layer-decay D (lower learning rates for
pretrained and earlier layers), --scheduler step|cosine|onecycle|constant with --warmup-epochs,
--label-smoothing, --optimizer sgd|adamw with --weight-decay, --find-lr / --lr auto, --augment,
--mixup/--cutmix, --model-ema, --bn-eval, --patience, --class-weights auto / --sampler
balanced for imbalanced classes.
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 --probe-epochs 0
(SGD, momentum 0.9, StepLR 7/0.1).
Writes config.yaml, metrics.jsonl, results.json and best/ to --output-dir.
"""

import dataclasses
import time

STARTED = time.time()  # before the imports (torch, timm, datasets: seconds): wall time counts them

from common.config import FinetuneConfig, parse_config  # noqa: E402
from common.data import build_dataloaders, class_weights, load_data, num_workers  # noqa: E402
from common.engine import BatchMix, make_loss  # noqa: E402
from common.errors import cli  # noqa: E402
from common.models import build_model, in_heads  # noqa: E402
from common.optim import build_optimizer  # noqa: E402
from common.probe import linear_probe  # noqa: E402
from common.runtime import Run, setup_run, use_channels_last  # noqa: E402
from common.trainer import fit  # noqa: E402


@cli
def main(argv=None):
    # a script's wall time counts its imports; a call from Python (a notebook, the tests)
    # starts its clock here
    started = STARTED if __name__ == "__main__" else time.time()
    cfg = parse_config(FinetuneConfig, __doc__, argv)
    accelerator, output_dir = setup_run(cfg, "finetune")
    if cfg.epochs != "auto" and 0 < cfg.epochs <= cfg.freeze_epochs:
        accelerator.print(f"warning: --epochs {cfg.epochs} <= --freeze-epochs "
                          f"{cfg.freeze_epochs}: only the head trains; pass --freeze-epochs 0 "
                          "(or more --epochs) to train every layer")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    built = build_model(cfg.model, len(class_names), cfg.pretrained, cfg.weights)
    weights = class_weights(cfg, train_ds, len(class_names))
    channels_last = use_channels_last(cfg, accelerator)
    probed = None
    if cfg.probe_epochs and cfg.streaming:
        accelerator.print("--streaming: no linear probe (cached features need random access); "
                          "the new head starts random")
        cfg = dataclasses.replace(cfg, probe_epochs=0)
    # (a resumed run has its weights; --epochs 0 evaluates the pretrained start as it is)
    restart_heads = None
    if cfg.probe_epochs and cfg.epochs != 0 and not cfg.resume_from_checkpoint:
        if cfg.finetune_from == "random":  # the heads as built, before the probe trains them
            restart_heads = {k: v.detach().clone() for k, v in built.model.state_dict().items()
                             if in_heads(k, built.head_names)}
        probed = linear_probe(accelerator, cfg, built, train_ds, val_ds,
                              num_workers(cfg, accelerator.num_processes), channels_last,
                              weights)
    train_loader, val_loader = build_dataloaders(train_ds, val_ds, built.preprocessing, cfg,
                                                 accelerator.num_processes)
    # every layer is in the optimiser from the start, even while --freeze-epochs holds the
    # backbone: frozen parameters get no gradient and are left alone until unfrozen
    optimizer = build_optimizer(cfg, built.model, built.head_names)
    run = Run(script="finetune", trained=built.model, export=built.model,
              head_names=built.head_names, model_heads=built.head_names,
              class_names=class_names, preprocessing=built.preprocessing,
              channels_last=channels_last, train_images=train_loader.dataset,
              val_images=val_loader.dataset, loss=make_loss(cfg.label_smoothing, weights),
              started=started, tta=cfg.tta, freeze_epochs=cfg.freeze_epochs,
              extra_results=probed,
              mix=BatchMix(cfg.mixup, cfg.cutmix, len(class_names), cfg.seed)
              if cfg.mixup or cfg.cutmix else None,
              evaluate_start=bool(probed), restart_heads=restart_heads, bn_eval=cfg.bn_eval)
    return fit(accelerator, cfg, run, optimizer, train_loader, val_loader, output_dir)


if __name__ == "__main__":
    main()
