"""Fine-tune an ImageNet-pretrained backbone on a small image dataset: new head, every layer.

Runs on CPU, one GPU, several GPUs or machines, in fp32/bf16/fp16, through Accelerate:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_finetune.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/multi_gpu_bf16.yaml train_finetune.py \\
        --data-dir DIR --model timm:convnext_tiny
By default: a linear probe first (--probe-epochs: a new head trained on cached features of the
frozen backbone, evaluated as epoch 0: the extractor's accuracy as a floor), then every layer
from a fresh head at one learning rate (AdamW, lr 0.001, weight decay 0.05; --optimizer sgd:
lr 0.01, momentum 0.9), BatchNorm statistics updated, for 8 epochs within 50 to 150 optimiser
steps (--epochs auto, --budget-epochs, --budget-min-steps, --budget-steps), annealed to the
end; the best epoch by --select-metric (epoch 0 included) is kept.
Strategies: --finetune-from probe (LP-FT: every layer from the probe's head), --freeze-epochs N
(head only on the fly), --backbone-lr-mult F and --layer-decay D (lower learning rates for
pretrained and earlier layers), --scheduler step|cosine|onecycle|constant with --warmup-epochs,
--label-smoothing, --optimizer sgd|adamw with --weight-decay, --find-lr / --lr auto, --augment,
--mixup/--cutmix, --model-ema, --bn-eval, --patience, --class-weights auto / --sampler
balanced for imbalanced classes, --train-size (smaller training crops, faster steps).
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 --probe-epochs 0
(SGD, momentum 0.9, StepLR 7/0.1).
Writes config.yaml, metrics.jsonl, results.json and best/ to --output-dir.
"""

import dataclasses
import time
from typing import Optional

STARTED = time.time()  # before the imports (torch, timm, datasets: seconds): wall time counts them

from common.config import FinetuneConfig, parse_config  # noqa: E402
from common.data import Data, build_dataloaders, class_weights, load_data, num_workers  # noqa: E402
from common.errors import cli  # noqa: E402
from common.hardware import use_channels_last  # noqa: E402
from common.image_size import set_image_size  # noqa: E402
from common.log import close_log_file, logger  # noqa: E402
from common.models import build_model  # noqa: E402
from common.optim import build_optimizer  # noqa: E402
from common.accelerator import setup_run  # noqa: E402
from common.probe import linear_probe  # noqa: E402
from common.trainer import fit  # noqa: E402


def finetune(argv: Optional[list] = None, **options) -> dict:
    """Fine-tune from Python (a notebook): `options` as the flags' names, e.g.
    `finetune(data_dir="flowers", epochs=5, report_to="none")`, and/or `argv` as on the
    command line (it wins over `options`). Returns the results, as results.json holds them.
    Raises UserError (RunFailure while running) with a one-line message; Ctrl-C saves a
    checkpoint first, then exits like the script."""
    cfg = parse_config(FinetuneConfig, __doc__, argv or [], options, where="finetune()")
    try:
        return run(cfg, started=time.time())
    finally:  # train.log complete and closed when the call returns
        close_log_file()


@cli
def main(argv: Optional[list] = None) -> dict:
    """The command line (`argv`: a list as on it; None: sys.argv): exit status 2 for a bad
    flag, 1 for a failure while running."""
    # a script's wall time counts its imports; a call from Python starts its clock here
    started = STARTED if __name__ == "__main__" else time.time()
    return run(parse_config(FinetuneConfig, __doc__, argv), started=started)


def run(cfg: FinetuneConfig, *, started: float) -> dict:
    """Build the data, the model and its optimiser, run the linear probe, fine-tune."""
    accelerator, output_dir = setup_run(cfg, "finetune", started)
    if cfg.epochs != "auto" and 0 < cfg.epochs <= cfg.freeze_epochs:
        logger.warning(f"--epochs {cfg.epochs} <= --freeze-epochs "
                       f"{cfg.freeze_epochs}: only the head trains; pass --freeze-epochs 0 "
                       "(or more --epochs) to train every layer")
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    network = build_model(cfg.model, len(class_names), cfg.pretrained, cfg.weights)
    logger.info(set_image_size(cfg, network, train_ds))
    network.channels_last = use_channels_last(cfg, accelerator)
    weights = class_weights(cfg, train_ds, len(class_names))
    workers = num_workers(cfg, accelerator.num_processes)
    if cfg.probe_epochs and cfg.streaming:
        logger.info("--streaming: no linear probe (cached features need random access); "
                    "the new head starts random")
        cfg = dataclasses.replace(cfg, probe_epochs=0)
    # (a resumed run has its weights; --epochs 0 evaluates the pretrained start as it is)
    probe = None
    if cfg.probe_epochs and cfg.epochs != 0 and not cfg.resume_from_checkpoint:
        probe = linear_probe(accelerator, cfg, network, train_ds, val_ds, workers=workers,
                             class_weights=weights, class_names=class_names)
    train_loader, val_loader = build_dataloaders(train_ds, val_ds, network.preprocessing, cfg,
                                                 accelerator.num_processes,
                                                 channels_last=network.channels_last)
    data = Data(class_names, train_loader, val_loader, train_images=train_loader.dataset,
                val_images=val_loader.dataset, class_weights=weights)
    # every layer is in the optimiser from the start, even while --freeze-epochs holds the
    # backbone: frozen parameters get no gradient and are left alone until unfrozen
    optimizer = build_optimizer(cfg, network.model, network.head_names)
    return fit(accelerator, cfg, network, data, optimizer, output_dir=output_dir,
               started=started, probe=probe)


if __name__ == "__main__":
    main()
