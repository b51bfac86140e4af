"""Train only a new head on a frozen ImageNet-pretrained backbone (feature extraction).

The backbone's parameters AND its BatchNorm running statistics stay exactly as pretrained.
By default its features are computed once (sharded over processes), cached, and the head
trains on them (--no-cache-features: the tutorial's way, the backbone runs every epoch in
eval mode). Runs wherever Accelerate runs:
    accelerate launch --config_file accelerate_configs/cpu.yaml train_extractor.py --data-dir DIR
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train_extractor.py \\
        --data-dir DIR --model timm:tf_efficientnet_lite0 --weights lite0.safetensors
The tutorial's recipe: --batch-size 4 --lr 0.001 --scheduler step --epochs 25 --no-cache-features
--feature-views 25 (a new augmentation every epoch). Writes config.yaml, metrics.jsonl,
results.json and best/ to --output-dir.
"""

import time
from typing import Optional

STARTED = time.time()  # before the imports (torch, timm, datasets: seconds): wall time counts them

from torch import nn  # noqa: E402

from common.accelerator import setup_run  # noqa: E402
from common.config import ExtractorConfig, parse_config  # noqa: E402
from common.data import Data, build_dataloaders, class_weights, load_data, num_workers  # noqa: E402
from common.errors import UserError, cli  # noqa: E402
from common.features import cached_feature_loaders  # noqa: E402
from common.hardware import use_channels_last  # noqa: E402
from common.image_size import set_image_size  # noqa: E402
from common.log import close_log_file, logger  # noqa: E402
from common.models import build_model, freeze_backbone  # noqa: E402
from common.optim import build_optimizer  # noqa: E402
from common.trainer import fit  # noqa: E402


def extract(argv: Optional[list] = None, **options) -> dict:
    """Train a new head on the frozen backbone from Python (a notebook): `options` as the
    flags' names, e.g. `extract(data_dir="flowers", report_to="none")`, and/or `argv` as on
    the command line (it wins over `options`). Returns the results, as results.json holds
    them. Raises UserError (RunFailure while running) with a one-line message; Ctrl-C saves
    a checkpoint first, then exits like the script."""
    cfg = parse_config(ExtractorConfig, __doc__, argv or [], options, where="extract()")
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
    return run(parse_config(ExtractorConfig, __doc__, argv), started=started)


def run(cfg: ExtractorConfig, *, started: float) -> dict:
    """Build the data (cached features by default) and the new heads' optimiser, train."""
    accelerator, output_dir = setup_run(cfg, "extractor", started)
    train_ds, val_ds, class_names = load_data(cfg, accelerator)
    network = build_model(cfg.model, len(class_names), cfg.pretrained, cfg.weights)
    logger.info(set_image_size(cfg, network, train_ds))
    freeze_backbone(network.model, network.head_names)  # requires_grad only on the heads
    network.channels_last = use_channels_last(cfg, accelerator)
    if cfg.cutmix and cfg.cache_features:
        raise UserError("--cutmix cuts images, and cached features are vectors: add "
                        "--no-cache-features (--mixup works on both)")
    weights = class_weights(cfg, train_ds, len(class_names))
    figures = None
    if cfg.cache_features:
        heads, train_loader, val_loader, train_images, val_images, figures = \
            cached_feature_loaders(accelerator, cfg, network, train_ds, val_ds,
                                   workers=num_workers(cfg, accelerator.num_processes))
        # the heads alone train, on feature vectors (no memory format); best/ holds the
        # whole model
        network.feature_heads, network.channels_last = heads, False
        data = Data(class_names, train_loader, val_loader, train_images=train_images,
                    val_images=val_images, class_weights=weights)
        optimizer = build_optimizer(cfg, heads)
    else:
        train_loader, val_loader = build_dataloaders(train_ds, val_ds, network.preprocessing,
                                                     cfg, accelerator.num_processes,
                                                     views=cfg.feature_views,
                                                     channels_last=network.channels_last)
        data = Data(class_names, train_loader, val_loader, train_images=train_loader.dataset,
                    val_images=val_loader.dataset, class_weights=weights)
        optimizer = build_optimizer(cfg, nn.ModuleList(
            [network.model.get_submodule(h) for h in network.head_names]))
    return fit(accelerator, cfg, network, data, optimizer, output_dir=output_dir,
               started=started, figures=figures)


if __name__ == "__main__":
    main()
