"""Flags, config files and the learning-rate schedule."""

import os
import re

import pytest
import yaml

from common.config import ExtractorConfig, FinetuneConfig, parse_config, save_config
from common.errors import UserError
from common.optim import lr_factor
from common.trainer import auto_epochs


def test_yaml_config_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-size: 4\nlr: 0.001\nscheduler: step\nepochs: 25\n")
    cfg = parse_config(FinetuneConfig, "", ["--config", str(path), "--epochs", "3"])
    assert (cfg.batch_size, cfg.lr, cfg.scheduler, cfg.epochs) == (4, 0.001, "step", 3)


def test_each_optimiser_gets_its_own_lr_and_weight_decay_unless_given(tmp_path):
    def parsed(*argv):
        cfg = parse_config(FinetuneConfig, "", list(argv))
        return cfg.optimizer, cfg.lr, cfg.weight_decay

    assert parsed() == ("adamw", 0.001, 0.05)  # the fine-tune's defaults (benchmarks/README)
    assert parsed("--optimizer", "sgd") == ("sgd", 0.01, 0.0)
    assert parsed("--lr", "0.003", "--weight-decay", "0") == ("adamw", 0.003, 0.0)
    assert parsed("--lr", "auto")[1] == "auto"
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: sgd\nlr: null\n")  # null: the optimiser's default
    assert parsed("--config", str(path)) == ("sgd", 0.01, 0.0)
    # the extractor trains a linear head only: SGD at its own rate, no decay
    ext = parse_config(ExtractorConfig, "", [])
    assert (ext.optimizer, ext.lr, ext.weight_decay) == ("sgd", 0.03, 0.0)


def _epochs(cfg, steps_per_epoch):
    return auto_epochs(cfg, steps_per_epoch, steps_per_epoch * 32)[0]


def test_epochs_auto_grows_with_the_set_within_a_budget_of_steps():
    cfg = FinetuneConfig()  # 8 epochs, within 50 to 150 optimiser steps, at least 3 epochs
    # steps per epoch at batch 32 -> epochs: hotdog (166 images), ants/bees (244), brain_mri
    # (400), clothing (990), 5,000 images, 20 images, cifar10 (10,000), 300,000 images
    got = {spe: _epochs(cfg, spe) for spe in (6, 8, 13, 31, 157, 1, 313, 9375)}
    assert got == {6: 9, 8: 8, 13: 8, 31: 5, 157: 3, 1: 50, 313: 3, 9375: 3}
    # --budget-min-steps = --budget-steps: the fixed budget of steps of earlier versions
    fixed = FinetuneConfig(budget_min_steps=150, budget_steps=150, budget_min_epochs=1)
    assert [_epochs(fixed, spe) for spe in (6, 13, 31, 157)] == [25, 12, 5, 1]
    # --budget: at most that many images seen, in whole epochs (at least one), and said
    capped = FinetuneConfig(budget=25000)
    assert auto_epochs(capped, 313, 10000) == (2, "--budget 25000 images seen")
    assert auto_epochs(capped, 9375, 300000)[0] == 1
    assert auto_epochs(capped, 31, 990)[0] == 5  # under the cap: as without it
    with pytest.raises(UserError, match="--budget-min-steps"):
        parse_config(FinetuneConfig, "", ["--budget-min-steps", "200"])


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(ExtractorConfig, "", ["--model", "timm:test_resnet", "--no-pretrained"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse_config(ExtractorConfig, "", ["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    assert yaml.safe_load(open(tmp_path / "config.yaml"))["pretrained"] is False


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--report-to", "mlflow"], "invalid choice: 'mlflow'"),
    (["--model", "resnet1"], "no torchvision or timm model named 'resnet1'; did you mean "
                             "resnet18,"),
    (["--model", "timm:convnext_tiy"], "did you mean timm:convnext_tiny"),
    (["--model", "convnext_tiny.fb_in23k"], "did you mean convnext_tiny.fb_in22k"),
    (["--model", "keras:resnet50"], "unknown library 'keras'"),
])
def test_bad_flags_are_rejected_at_parse_time(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_config(FinetuneConfig, "", argv)


def test_unknown_key_in_config_file_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("batchsize: 4\n")
    with pytest.raises(UserError, match="unknown option 'batchsize'; did you mean 'batch_size'"):
        parse_config(FinetuneConfig, "", ["--config", str(tmp_path / "c.yaml")])


def test_null_for_a_plain_bool_in_a_config_file_is_refused(tmp_path):
    # config.yaml files written before --bn-eval became a plain bool hold `bn_eval: null`
    # (then: on with pretrained weights); reading it as off would silently change the recipe
    (tmp_path / "c.yaml").write_text("bn_eval: null\nlayer_decay: null\n")
    with pytest.raises(UserError, match="'bn_eval' should be bool, got null"):
        parse_config(FinetuneConfig, "", ["--config", str(tmp_path / "c.yaml")])


@pytest.mark.parametrize("name, library, arch", [
    ("resnet18", "torchvision", "resnet18"),            # the tutorial's: torchvision has it
    ("convnext_tiny", "torchvision", "convnext_tiny"),
    ("tf_efficientnet_lite0", "timm", "tf_efficientnet_lite0"),  # torchvision lacks it
    ("convnext_tiny.fb_in22k", "timm", "convnext_tiny.fb_in22k"),  # timm's NAME.TAG
    ("test_resnet", "timm", "test_resnet"),
    ("efficientnet_lite0", "timm", "tf_efficientnet_lite0"),  # the former default's name
    ("timm:efficientnet_lite0", "timm", "efficientnet_lite0"),  # timm's own, another network
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("hf-hub:timm/resnet18.a1_in1k", "timm", "hf-hub:timm/resnet18.a1_in1k"),
])
def test_model_names_as_timm_and_torchvision_users_write_them(name, library, arch):
    from common.models import check_model_name, split_model_name

    assert split_model_name(name) == (library, arch)
    check_model_name(name)  # known: no error


def test_the_default_model_is_spelled_as_timm_spells_it():
    assert FinetuneConfig().model == ExtractorConfig().model == "tf_efficientnet_lite0"


def test_tutorial_step_schedule_decays_every_7_epochs():
    cfg = FinetuneConfig(scheduler="step", lr=1e-3, epochs=25)
    per_epoch = [lr_factor(cfg, e * 61, 61) for e in range(25)]  # batch 4: 61 steps/epoch
    assert per_epoch[:7] == [1.0] * 7
    assert per_epoch[7:14] == pytest.approx([0.1] * 7)
    assert per_epoch[14:21] == pytest.approx([0.01] * 7)
    assert lr_factor(cfg, 7 * 61 - 1, 61) == 1.0  # last step of epoch 7


@pytest.mark.parametrize("scheduler", ["cosine", "step", "constant"])
def test_lr_at_an_epoch_is_the_same_on_1_and_2_processes(scheduler):
    cfg = FinetuneConfig(scheduler=scheduler, epochs=10, warmup_epochs=1, step_size=3)
    # 2 processes take half as many optimiser steps per epoch. (Inside the warmup the
    # ramp is per step, so it is as fine-grained as the steps are.)
    for epoch in (1, 2.5, 3, 6, 9.5):
        assert lr_factor(cfg, int(epoch * 8), 8) == pytest.approx(lr_factor(cfg, int(epoch * 4), 4))


def test_cosine_with_warmup_shape():
    cfg = FinetuneConfig(scheduler="cosine", epochs=4, warmup_epochs=1)
    f = [lr_factor(cfg, s, 10) for s in range(40)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[25] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01


def test_help_lists_the_flags_the_checks_rely_on():
    proc = __import__("conftest").in_process("train_finetune.py", ["--help"], dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for flag in ("--data-dir", "--dataset", "--model", "--weights", "--no-pretrained",
                 "--epochs", "--batch-size", "--lr", "--seed", "--output-dir", "--report-to",
                 "--num-workers", "--gradient-accumulation-steps"):
        assert flag in out


def test_the_default_run_folder_names_the_script_model_and_data():
    from common.rundir import run_name

    assert run_name(FinetuneConfig(), "finetune") == \
        "finetune-tf_efficientnet_lite0-hymenoptera_data"
    cfg = ExtractorConfig(model="timm:convnext_tiny", data_dir="/data/flowers/")
    assert run_name(cfg, "extractor") == "extractor-convnext_tiny-flowers"
    cfg = FinetuneConfig(model="hf-hub:user/my: model", dataset="user/beans #2")
    assert run_name(cfg, "finetune") == "finetune-my_model-beans_2"


@pytest.mark.parametrize("raised,status", [("usage", 2), ("failure", 1), ("ctrl-c", 130)])
def test_exit_status_2_for_usage_1_for_failures_130_for_ctrl_c(raised, status, capsys):
    from common.errors import RunFailure, UserError, cli

    @cli
    def main():
        raise {"usage": UserError("bad flag"), "failure": RunFailure("loss diverged"),
               "ctrl-c": KeyboardInterrupt()}[raised]

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == status
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # one line, no traceback
