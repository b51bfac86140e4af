"""Run configuration: one dataclass per script, an argparse parser built from it, YAML files.

Precedence, lowest first: the dataclass defaults, `--config FILE.yaml`, command-line flags.
Every field becomes a flag with dashes (`batch_size` -> `--batch-size`); booleans get both
forms (`--pretrained` / `--no-pretrained`). The resolved config is written to the run folder
as `config.yaml`, which `--config` accepts back to repeat a run.

Mixed precision and the number of processes are not here: they belong to the launcher
(`accelerate launch --mixed_precision bf16 --num_processes 2`, or an accelerate config file),
as in every Accelerate script.
"""

import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import yaml

from common.errors import UserError


def float_or_auto(text: Any) -> Union[float, str]:
    """--lr: a number, or 'auto' (an LR range test picks it, see common/lr_finder.py)."""
    return "auto" if str(text).strip().lower() == "auto" else float(text)


def int_or_auto(text: Any) -> Union[int, str]:
    """--epochs: a number, or 'auto' (see --budget-epochs)."""
    return "auto" if str(text).strip().lower() == "auto" else int(text)


def opt(default: Any, help: str, **kwargs) -> Any:
    """A config field with its help text (and optional argparse `choices`)."""
    return field(default=default, metadata=dict(help=help, **kwargs))


@dataclass
class TrainConfig:
    # data
    data_dir: Optional[str] = opt(None, "image folder with train/ and val/ class sub-folders "
                                  "(no val/: a stratified --val-fraction is split off train/). "
                                  "Without --data-dir or --dataset: the tutorial's ants/bees "
                                  "set, from the compact copy shipped with the package")
    download_original_data: bool = opt(False, "without --data-dir or --dataset, download the "
                                       "tutorial's original ants/bees archive into data/ "
                                       "instead of using the shipped compact copy")
    dataset: Optional[str] = opt(None, "a Hugging Face Hub dataset name, or a local folder "
                                 "of parquet/arrow files or a save_to_disk() folder")
    streaming: bool = opt(False, "read --dataset as a stream (datasets larger than memory or "
                          "disk): no up-front image check, no cached features")
    shuffle_buffer: int = opt(10000, "--streaming: examples in the shuffle buffer")
    image_column: str = opt("image", "image column of --dataset")
    label_column: str = opt("label", "label column of --dataset (ClassLabel, strings or ints)")
    train_split: str = opt("train", "training split of --dataset")
    val_split: str = opt("validation", "validation split of --dataset (falls back to 'val', "
                         "'valid', 'test'; none: split off --val-fraction of train)")
    val_fraction: float = opt(0.2, "fraction of train held out when there is no validation set")
    strict_images: bool = opt(False, "stop on an unreadable image instead of skipping it "
                              "with a warning")
    num_workers: int = opt(-1, "DataLoader worker processes per training process "
                           "(-1: the cores left after the training processes' torch threads, at most 8; "
                           "0 when training on a CPU that torch already fills)")
    val_cache_mb: int = opt(-1, "memory per training process for the val images' decoded, "
                            "resized pixels, kept between epochs so that each image is read "
                            "once (-1: 1/16 of the RAM, at most 1024; 0: off)")
    # model
    model: str = opt("tf_efficientnet_lite0", "backbone, named as in timm or torchvision: "
                     "a name torchvision has is its model (resnet18, the tutorial's), any "
                     "other a timm model (convnext_tiny.fb_in22k); timm:NAME, "
                     "torchvision:NAME and hf-hub:ORG/NAME choose explicitly. The default's "
                     "ImageNet weights are installed with the package")
    weights: Optional[str] = opt(None, "local pretrained weights (.safetensors, or a torch "
                                 "file loaded weights-only) instead of the library's download")
    pretrained: bool = opt(True, "start from pretrained weights (--no-pretrained: random init)")
    image_size: object = opt("auto", "side in pixels the model trains, evaluates and is "
                             "exported at (auto: the model's input size; the fine-tune's, "
                             "twice the training images' median side when they are at most "
                             "half of it, at least 128)", parse=int_or_auto)
    # optimisation
    epochs: int = opt(10, "training epochs (0: only evaluate the starting model)")
    batch_size: int = opt(32, "images per process per step (global batch = batch-size x "
                          "processes x gradient-accumulation-steps)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimiser step")
    optimizer: str = opt("sgd", "optimiser", choices=("sgd", "adamw"))
    lr: float = opt(0.01, "peak learning rate of the head, or 'auto': run the LR range "
                    "test (--find-lr) first and train with its suggestion", parse=float_or_auto)
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(0.0, "weight decay (never on biases and norm weights)")
    label_smoothing: float = opt(0.0, "label smoothing of the training loss (the val loss "
                                 "stays plain cross-entropy)")
    scheduler: str = opt("cosine", "learning-rate schedule over the epochs, applied per "
                         "optimiser step (onecycle: torch's OneCycleLR shape, its rise "
                         "lasting --warmup-epochs or 30%% of the epochs)",
                         choices=("cosine", "step", "onecycle", "constant"))
    warmup_epochs: float = opt(0.0, "linear warmup from 0, in epochs (fractions allowed)")
    step_size: int = opt(7, "--scheduler step: epochs between decays (tutorial: 7)")
    gamma: float = opt(0.1, "--scheduler step: decay factor (tutorial: 0.1)")
    train_crop_scale: float = opt(0.08, "RandomResizedCrop's smallest area fraction "
                                  "(tutorial and torchvision default: 0.08)")
    augment: str = opt("basic", "training augmentation after RandomResizedCrop + flip: basic "
                       "(nothing more), trivial (TrivialAugmentWide), randaugment (RandAugment)",
                       choices=("basic", "trivial", "randaugment"))
    random_erasing: float = opt(0.0, "probability of RandomErasing on each training image")
    mixup: float = opt(0.0, "MixUp alpha (0: off); per batch, seeded by (seed, epoch, batch)")
    cutmix: float = opt(0.0, "CutMix alpha (0: off); with --mixup too, each batch gets one "
                        "of them")
    class_weights: str = opt("none", "loss weights per class: auto = inverse frequency in "
                             "train (for imbalanced classes)", choices=("none", "auto"))
    sampler: str = opt("random", "training order: random (shuffled), or balanced (each class "
                       "drawn equally often, with replacement)", choices=("random", "balanced"))
    tta: bool = opt(False, "test-time augmentation: evaluate on each val image and its "
                    "horizontal mirror, averaging the logits (as predict.py --tta does)")
    select_metric: str = opt("accuracy", "val metric that picks the best epoch (and stops "
                             "early with --patience)",
                             choices=("accuracy", "macro_f1", "balanced_accuracy", "loss"))
    patience: int = opt(0, "stop after N evaluations without a better --select-metric "
                        "(0: never); the best model is kept")
    model_ema: bool = opt(False, "also keep an exponential moving average of the weights, "
                          "evaluated every epoch and exported when it is the better model")
    model_ema_decay: float = opt(0.998, "--model-ema: weight of the old average at each "
                                 "optimiser step, once warmed up (1 - (1 + step)^-0.75 "
                                 "until then, as timm's EMA)")
    feature_views: int = opt(1, "cached features: training views per image; 0 = one "
                             "un-augmented centre view; K >= 1 = K augmented views (epoch e "
                             "uses view e mod K); extraction costs K forward passes per image")
    feature_cache_dir: Optional[str] = opt(None, "where cached features live (default: "
                                           "~/.cache/transfer-learning/features)")
    extract_precision: str = opt("auto", "precision of the frozen backbone's forward when "
                                 "caching features (auto: bf16 on GPUs and CPUs with native "
                                 "bf16, else fp32; bf16 runs with the BatchNorm layers folded "
                                 "into the convolutions; features are stored in fp32)",
                                 choices=("auto", "fp32", "bf16"))
    channels_last: Optional[bool] = opt(None, "channels-last memory format; default: on "
                                        "(faster convolutions on GPUs and fp32 CPUs), except "
                                        "bf16 on CPUs without native bf16, where it is slower")
    compile: bool = opt(False, "torch.compile the trained model (inductor); compiling adds "
                        "tens of seconds to minutes at the start (benchmarks/README.md)")
    find_lr: bool = opt(False, "run an LR range test (exponential sweep, smoothed loss, stops "
                        "on divergence), save lr_find.png/.json, print the suggestion and stop; "
                        "the weights are restored after it. --lr auto runs it, then trains")
    find_lr_steps: int = opt(100, "optimiser steps of the LR range test")
    max_train_steps: int = opt(0, "stop training after N optimiser steps in all (0: no limit), "
                               "then evaluate: a smoke test or a time box")
    log_every: int = opt(10, "log the training loss every N optimiser steps (and at each epoch "
                         "end); the loop syncs with the host only then")
    # checkpoints
    checkpointing_steps: str = opt("epoch", "save the full training state every N optimiser "
                                   "steps, at the end of every 'epoch', or 'no'")
    checkpoints_total_limit: int = opt(2, "keep the last K checkpoints (0: keep all)")
    resume_from_checkpoint: Optional[str] = opt(None, "'latest' (of this --output-dir) or a "
                                                "checkpoint folder: continue that run exactly")
    # run
    seed: int = opt(42, "random seed (data order, head initialisation, augmentation)")
    output_dir: Optional[str] = opt(None, "run folder (default: outputs/<script>-<model>-"
                                           "<data>-<date>-<time>)")
    overwrite_output_dir: bool = opt(False, "reuse an --output-dir that holds a run: its "
                                     "results, metrics, best/ and checkpoints/ are replaced")
    report_to: str = opt("wandb", "experiment tracker; W&B runs offline when no account is "
                         "configured", choices=("wandb", "tensorboard", "none"))
    project: str = opt("transfer-learning", "tracker project name")
    run_name: Optional[str] = opt(None, "tracker run name (default: the run folder's name)")
    group: Optional[str] = opt(None, "W&B group (default: <dataset>/<model>, so fine-tune "
                               "and extractor runs of one backbone sit together)")
    tags: Optional[str] = opt(None, "comma-separated W&B tags")
    log_level: str = opt("info", "what the console and the run folder's train.log say",
                         choices=("debug", "info", "warning", "error"))
    quiet: bool = opt(False, "on the console only warnings, errors and the final result line "
                      "(train.log keeps every line at --log-level)")


@dataclass
class FinetuneConfig(TrainConfig):
    """train_finetune.py: a linear probe first (the new head trained on cached features of the
    frozen backbone, as train_extractor.py does) evaluated as epoch 0, then every layer from a
    fresh head. Defaults chosen on five datasets (benchmarks/README.md)."""

    script: ClassVar[str] = "finetune"
    epochs: object = opt("auto", "fine-tuning epochs (0: only evaluate; auto: --budget-epochs, "
                         "within --budget-min-steps and --budget-steps, at least "
                         "--budget-min-epochs, at most --budget images)", parse=int_or_auto)
    budget_epochs: int = opt(8, "--epochs auto: this many epochs, unless they hold fewer than "
                             "--budget-min-steps or more than --budget-steps optimiser steps")
    budget_min_steps: int = opt(50, "--epochs auto: at least this many optimiser steps (a few "
                                "hundred images get more than --budget-epochs epochs)")
    budget_steps: int = opt(150, "--epochs auto: at most this many optimiser steps, rounded "
                            "up to whole epochs, unless that is fewer than "
                            "--budget-min-epochs")
    budget_min_epochs: int = opt(3, "--epochs auto: at least this many epochs however many "
                                 "images (sets of thousands and more)")
    budget: Optional[int] = opt(None, "--epochs auto: at most this many training images seen "
                                "(whole epochs, at least one), where compute is scarce")
    train_size: Optional[int] = opt(None, "side in pixels of the crops every layer trains on "
                                    "(default: the model's input size); the linear probe and "
                                    "every evaluation stay at the input size")
    optimizer: str = opt("adamw", "optimiser: adamw, or sgd (momentum --momentum)",
                         choices=("sgd", "adamw"))
    lr: Optional[float] = opt(None, "peak learning rate of the head (default: 0.001 with "
                              "adamw, 0.01 with sgd), or 'auto': run the LR range test "
                              "(--find-lr) first and train with its suggestion",
                              parse=float_or_auto)
    weight_decay: Optional[float] = opt(None, "weight decay, never on biases and norm "
                                        "weights (default: 0.05 with adamw, 0 with sgd)")
    probe_epochs: int = opt(10, "linear probe first: train the new head for N epochs on cached "
                            "features of the frozen backbone (seconds) and evaluate it as epoch "
                            "0, the extractor's accuracy as a floor (0: no probe)")
    probe_lr: float = opt(0.03, "learning rate of the linear probe")
    finetune_from: str = opt("random", "the head every layer fine-tunes from: a fresh random "
                             "one (the probe's model then stays epoch 0's candidate, a floor at "
                             "the extractor's accuracy), or the probe's (probe: LP-FT)",
                             choices=("probe", "random"))
    freeze_epochs: int = opt(0, "train only the new head for the first N epochs on the fly "
                             "(backbone frozen, BatchNorm statistics included), then every layer")
    backbone_lr_mult: float = opt(1.0, "backbone learning rate = head lr x this")
    layer_decay: Optional[float] = opt(None, "layer-wise lr decay D (timm-style): a backbone "
                                       "layer k below the top learns at lr x mult x D^k")
    bn_eval: bool = opt(False, "keep BatchNorm layers in eval mode (running statistics as "
                        "pretrained, as the linear probe saw them) while every layer trains; "
                        "off: they update from the training batches")

    def __post_init__(self):
        # each optimiser's own rate and decay, those measured on the suite (AdamW was never
        # run at SGD's 0.01, nor SGD with AdamW's decay of 0.05)
        if self.lr is None:
            self.lr = 0.001 if self.optimizer == "adamw" else 0.01
        if self.weight_decay is None:
            self.weight_decay = 0.05 if self.optimizer == "adamw" else 0.0


@dataclass
class ExtractorConfig(TrainConfig):
    """train_extractor.py: only the new head is trained, so it takes a larger step size."""

    script: ClassVar[str] = "extractor"
    lr: float = opt(0.03, "peak learning rate (only the linear head learns), or 'auto'",
                    parse=float_or_auto)
    epochs: int = opt(10, "training epochs (cheap with cached features; 0: only evaluate)")
    cache_features: bool = opt(True, "compute the frozen backbone's features once and train "
                               "the head on them (--no-cache-features: every epoch, on the fly)")


def _flag(name):
    return "--" + name.replace("_", "-")


def _field_type(f):
    """The concrete type of a field: `Optional[str]` -> str."""
    t = f.type if not isinstance(f.type, str) else eval(f.type, vars(typing))  # noqa: S307
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help gives it (--lr: by optimiser)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line, like every other error here, not a page of usage: a
    UserError (exit status 2 from the command line; an exception to catch from Python)."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = _Parser(
        description=description, formatter_class=_Formatter)
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file of options (keys as the flags, with - or _)")
    for f in dataclasses.fields(cls):
        t = _field_type(f)
        kwargs = dict(dest=f.name, default=f.default, help=f.metadata["help"])
        if t is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = f.metadata.get("parse", t)
            kwargs["choices"] = f.metadata.get("choices")
        parser.add_argument(_flag(f.name), **kwargs)
    return parser


def _read_yaml(parser, path, cls):
    try:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    except OSError as e:
        parser.error(f"--config {path}: cannot read it ({e.strerror})")
    except yaml.YAMLError as e:
        parser.error(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option: value")
    return _typed_options(parser, values, cls, f"--config {path}")


def _typed_options(parser, values, cls, where):
    """`values` (option: value, from a YAML file or a Python call) checked against the
    config's fields and parsed like their flags."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            parser.error(f"{where}: unknown option '{key}'"
                         + (f"; did you mean '{close[0]}'?" if close else ""))
        t = _field_type(known[name])
        if value is None and t is known[name].type:  # not Optional: null is no value of it
            # (a config.yaml from before --bn-eval became a plain bool holds `bn_eval: null`)
            parser.error(f"{where}: '{key}' should be {t.__name__}, got null")
        parse = known[name].metadata.get("parse", t)
        if value is not None and t is not bool and (parse is not t or not isinstance(value, t)):
            try:
                value = parse(value)
            except (TypeError, ValueError):
                parser.error(f"{where}: '{key}' should be {t.__name__}, got {value!r}")
        if value is not None and t is bool and not isinstance(value, bool):
            parser.error(f"{where}: '{key}' should be bool, got {value!r}")
        choices = known[name].metadata.get("choices")
        if choices and value is not None and value not in choices:
            parser.error(f"{where}: '{key}' should be one of {', '.join(map(str, choices))}, "
                         f"got {value!r}")
        out[name] = value
    return out


def _validate(parser, cfg):
    """Reject values that cannot work, at parse time, naming the flag."""
    checks = [
        (cfg.epochs == "auto" or cfg.epochs >= 0, "--epochs must be >= 0 (or auto)"),
        (getattr(cfg, "budget_steps", 1) >= 1, "--budget-steps must be >= 1"),
        (getattr(cfg, "budget_epochs", 1) >= 1, "--budget-epochs must be >= 1"),
        (getattr(cfg, "budget_min_epochs", 1) >= 1, "--budget-min-epochs must be >= 1"),
        (getattr(cfg, "budget", None) is None or cfg.budget >= 1, "--budget must be >= 1 "
         "(training images seen)"),
        (0 <= getattr(cfg, "budget_min_steps", 0) <= getattr(cfg, "budget_steps", 1),
         "--budget-min-steps must be in [0, --budget-steps]"),
        (cfg.image_size == "auto" or cfg.image_size >= 32, "--image-size must be >= 32 or "
         "auto"),
        (getattr(cfg, "train_size", None) is None or cfg.train_size >= 8,
         "--train-size must be >= 8 pixels"),
        (getattr(cfg, "probe_epochs", 0) >= 0, "--probe-epochs must be >= 0"),
        (cfg.patience >= 0, "--patience must be >= 0"),
        (0 <= cfg.random_erasing <= 1, "--random-erasing must be in [0, 1]"),
        (cfg.mixup >= 0 and cfg.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
        (0 < cfg.model_ema_decay < 1, "--model-ema-decay must be in (0, 1)"),
        (cfg.batch_size >= 1, "--batch-size must be >= 1"),
        (cfg.gradient_accumulation_steps >= 1, "--gradient-accumulation-steps must be >= 1"),
        (cfg.lr == "auto" or cfg.lr > 0, "--lr must be > 0 (or auto)"),
        (0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (cfg.find_lr_steps >= 5, "--find-lr-steps must be >= 5"),
        (cfg.log_every >= 1, "--log-every must be >= 1"),
        (cfg.max_train_steps >= 0, "--max-train-steps must be >= 0"),
        (getattr(cfg, "freeze_epochs", 0) >= 0, "--freeze-epochs must be >= 0"),
        (getattr(cfg, "backbone_lr_mult", 1) >= 0, "--backbone-lr-mult must be >= 0"),
        (getattr(cfg, "layer_decay", None) is None or 0 < cfg.layer_decay <= 1,
         "--layer-decay must be in (0, 1]"),
        (not (cfg.scheduler == "onecycle" and cfg.epochs not in (0, "auto")
              and cfg.warmup_epochs >= cfg.epochs),
         "--warmup-epochs must be shorter than --epochs for --scheduler onecycle"),
        (cfg.weight_decay >= 0, "--weight-decay must be >= 0"),
        (cfg.warmup_epochs >= 0, "--warmup-epochs must be >= 0"),
        (cfg.step_size >= 1, "--step-size must be >= 1"),
        (0 < cfg.val_fraction < 1, "--val-fraction must be between 0 and 1"),
        (0 < cfg.train_crop_scale <= 1, "--train-crop-scale must be in (0, 1]"),
        (cfg.num_workers >= -1, "--num-workers must be >= 0 (or -1 for automatic)"),
        (cfg.val_cache_mb >= -1, "--val-cache-mb must be >= 0 (or -1 for automatic)"),
        (getattr(cfg, "feature_views", 0) >= 0, "--feature-views must be >= 0"),
        (not (cfg.data_dir and cfg.dataset), "give --data-dir or --dataset, not both"),
        (not cfg.streaming or cfg.dataset, "--streaming reads a --dataset (Hub or parquet)"),
        (not (cfg.streaming and getattr(cfg, "cache_features", False)),
         "--streaming cannot cache features (they need random access): add --no-cache-features"),
        (cfg.shuffle_buffer >= 1, "--shuffle-buffer must be >= 1"),
        (not (cfg.tta and getattr(cfg, "cache_features", False)),
         "--tta mirrors images, and cached val features are of one view: add "
         "--no-cache-features (predict.py --tta works with any exported model)"),
        (not (cfg.download_original_data and (cfg.data_dir or cfg.dataset)),
         "--download-original-data is for runs without --data-dir or --dataset"),
        (not (cfg.weights and not cfg.pretrained), "--weights and --no-pretrained contradict"),
        (cfg.checkpointing_steps in ("epoch", "no") or (cfg.checkpointing_steps.isdigit()
                                                       and int(cfg.checkpointing_steps) > 0),
         "--checkpointing-steps must be a positive number of steps, 'epoch' or 'no'"),
        (cfg.checkpoints_total_limit >= 0, "--checkpoints-total-limit must be >= 0"),
        (not (cfg.resume_from_checkpoint == "latest" and not cfg.output_dir),
         "--resume-from-checkpoint latest needs the --output-dir of the run to resume"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    from common.models import check_model_name  # imports timm: only once flags are sane

    try:
        check_model_name(cfg.model)
    except ValueError as e:
        parser.error(f"--model: {e}")


def parse_config(cls: type, description: str, argv: Optional[list] = None,
                 options: Optional[dict] = None, where: str = "") -> TrainConfig:
    """Parse `argv` (None: the command line) into a `cls` instance. `options` (keyword
    arguments of a Python call, named `where` in errors) are read like a --config file's,
    below the flags. Raises UserError, one line, for a bad flag, option or value."""
    parser = build_parser(cls, description)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_read_yaml(parser, pre.config, cls))
    if options:
        parser.set_defaults(**_typed_options(parser, options, cls, where or cls.script))
    args = vars(parser.parse_args(argv))
    args.pop("config")
    cfg = cls(**args)
    _validate(parser, cfg)
    return cfg


def save_config(cfg: TrainConfig, path: str) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False)
