"""Fine-tuning strategies: freeze -> unfreeze, per-group learning rates, label smoothing,
the LR range test; on 1 and 2 processes under `accelerate launch`."""

import glob
import json
import os

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from common.config import FinetuneConfig
from common.ema import ModelEma, ema_decay
from common.lr_finder import suggest
from common.optim import lr_factor, param_groups
from common.viz import lr_find_png
from conftest import launch

TINY = ["--model", "timm:test_resnet", "--batch-size", "4", "--num-workers", "0",
        "--report-to", "none", "--probe-epochs", "0"]  # (the probe has its own test below)


def rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def checkpoint_weights(out):
    """Model tensors of every checkpoint, oldest first."""
    folders = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*")),
                     key=lambda p: int(p.rsplit("-", 1)[1]))
    return [load_file(os.path.join(f, "model.safetensors")) for f in folders]


def test_param_groups_scale_lrs_and_skip_weight_decay_on_biases_and_norms():
    model = torchvision.models.resnet18(num_classes=3)
    cfg = FinetuneConfig(lr=0.1, backbone_lr_mult=0.1, layer_decay=0.5, weight_decay=1e-4)
    groups = param_groups(model, ("fc",), cfg, cfg.lr)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)  # every parameter, once
    assert by_param[id(named["fc.weight"])]["lr"] == pytest.approx(0.1)
    # torchvision ResNet layers, bottom to top: conv1, bn1, layer1.0 ... layer4.1, fc
    assert by_param[id(named["layer4.1.conv2.weight"])]["lr"] == pytest.approx(0.1 * 0.1 * 0.5)
    assert by_param[id(named["layer4.0.conv1.weight"])]["lr"] == pytest.approx(0.1 * 0.1 * 0.25)
    assert by_param[id(named["conv1.weight"])]["lr"] == pytest.approx(0.1 * 0.1 * 0.5 ** 10)
    for name, p in named.items():
        assert by_param[id(p)]["weight_decay"] == (1e-4 if p.ndim > 1 else 0.0), name
    assert groups[0]["name"] == "head"


def test_onecycle_rises_then_anneals():
    cfg = FinetuneConfig(scheduler="onecycle", epochs=10)
    f = [lr_factor(cfg, s, 10) for s in range(100)]
    assert f[0] == pytest.approx(1 / 25)
    assert max(f) == pytest.approx(f[30], abs=1e-3) and f[30] > 0.99  # peak after 30%
    assert f[-1] < 0.01
    assert all(a <= b for a, b in zip(f[:30], f[1:31]))


@pytest.mark.parametrize("nproc", [1, 2])
def test_freeze_epochs_keep_backbone_and_batchnorm_then_train_them(nproc, image_folder,
                                                                   tiny_weights, tmp_path,
                                                                   offline_env):
    args = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights]
    out, start_run = tmp_path / "run", tmp_path / "start"
    # --no-bn-eval: after the unfreeze, BatchNorm statistics update too (checked below)
    launch("train_finetune.py", [*args, "--epochs", "3", "--freeze-epochs", "2",
                                 "--checkpoints-total-limit", "0", "--output-dir", out,
                                 "--no-bn-eval"], offline_env, nproc=nproc)
    # the same seed with --epochs 0 exports the starting model: pretrained body, new head
    launch("train_finetune.py", [*args, "--epochs", "0", "--output-dir", start_run],
           offline_env, nproc=nproc)
    start = load_file(str(start_run / "best" / "model.safetensors"))
    assert [r["stage"] for r in rows(out)] == ["head", "head", "all-layers"]
    assert [r["stage"] for r in rows(start_run)] == ["start"]
    after = checkpoint_weights(out)  # after epochs 1, 2, 3
    assert len(after) == 3
    backbone = [k for k in start if not k.startswith("fc.")]
    assert all(torch.equal(start[k], load_file(tiny_weights)[k]) for k in backbone)
    before = [start] + after
    for epoch in (0, 1):  # frozen: parameters and BatchNorm statistics bit-identical...
        changed = [k for k in backbone if not torch.equal(start[k], after[epoch][k])]
        assert not changed, f"epoch {epoch + 1} changed {changed[:5]}"
        # ...while the head learns in each of those epochs
        assert not torch.equal(after[epoch]["fc.weight"], before[epoch]["fc.weight"])
    moved = [k for k in backbone if not torch.equal(after[1][k], after[2][k])]
    assert any(k.endswith("running_mean") for k in moved)  # BN statistics update again
    assert any(k.endswith("conv1.0.weight") for k in moved)  # first layer learns


def test_resume_at_the_unfreeze_matches_the_uninterrupted_run(image_folder, tiny_weights,
                                                              tmp_path, offline_env):
    args = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights, "--epochs", "3",
            "--freeze-epochs", "1", "--checkpoints-total-limit", "0", "--optimizer", "adamw",
            "--lr", "0.003"]
    full = tmp_path / "full"
    launch("train_finetune.py", [*args, "--output-dir", full], offline_env)
    first = sorted(glob.glob(str(full / "checkpoints" / "step-*")),
                   key=lambda p: int(p.rsplit("-", 1)[1]))[0]  # end of the frozen epoch
    resumed = tmp_path / "resumed"
    launch("train_finetune.py", [*args, "--output-dir", resumed,
                                 "--resume-from-checkpoint", first], offline_env)
    a, b = json.load(open(full / "results.json")), json.load(open(resumed / "results.json"))
    assert a["optimizer_steps"] == b["optimizer_steps"]
    assert a["final_val_accuracy"] == b["final_val_accuracy"]
    assert a["final_val_loss"] == pytest.approx(b["final_val_loss"], rel=1e-5)
    wa, wb = checkpoint_weights(full)[-1], checkpoint_weights(resumed)[-1]
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_lr_of_each_group_follows_the_schedule_on_1_and_2_processes(image_folder, tmp_path,
                                                                   offline_env):
    args = ["--data-dir", image_folder, *TINY, "--no-pretrained", "--epochs", "3",
            "--lr", "0.2", "--backbone-lr-mult", "0.1", "--layer-decay", "0.5",
            "--warmup-epochs", "0.5", "--scheduler", "cosine", "--label-smoothing", "0.1",
            "--checkpointing-steps", "no"]
    cfg = FinetuneConfig(epochs=3, warmup_epochs=0.5, scheduler="cosine")
    seen = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        launch("train_finetune.py", [*args, "--output-dir", out], offline_env, nproc=nproc)
        seen[nproc] = [r["lr_groups"] for r in rows(out)]
        steps_per_epoch = json.load(open(out / "results.json"))["steps_per_epoch"]
        assert steps_per_epoch == (5 if nproc == 1 else 3)  # 18 images, batch 4 per process
        for epoch, lrs in enumerate(seen[nproc], start=1):
            f = lr_factor(cfg, epoch * steps_per_epoch, steps_per_epoch)  # after the epoch
            # test_resnet: blocks 0-4 below the head; the top block gets 0.2 x 0.1 x 0.5
            assert lrs["head"] == pytest.approx(0.2 * f)
            assert lrs["backbone.4"] == pytest.approx(0.2 * 0.1 * 0.5 * f)
            assert lrs["backbone.0"] == pytest.approx(0.2 * 0.1 * 0.5 ** 5 * f)
    for one, two in zip(seen[1], seen[2]):
        assert one.keys() == two.keys()
        assert [one[k] for k in one] == pytest.approx([two[k] for k in one])


def test_label_smoothing_changes_the_training_loss_only(image_folder, tmp_path, offline_env):
    from common.data import build_transforms, load_image_folder
    from common.export import load_exported

    # SGD at 0.01: in one epoch the random tiny model moves far enough from uniform outputs
    # for smoothing to show in the loss (AdamW at 0.001 stays near ln 3, where it barely does)
    common = ["--data-dir", image_folder, *TINY, "--no-pretrained", "--epochs", "1",
              "--optimizer", "sgd", "--checkpointing-steps", "no"]
    out = {}
    for ls in ("0", "0.2"):
        out[ls] = tmp_path / f"ls{ls}"
        launch("train_finetune.py", [*common, "--label-smoothing", ls, "--output-dir",
                                     out[ls]], offline_env)
    plain, smooth = rows(out["0"])[0], rows(out["0.2"])[0]
    assert smooth["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-3)
    # the val loss is plain cross-entropy of the model, not the smoothed objective: computed
    # again here from the exported model (1 epoch: the best model is the final one)
    model, meta = load_exported(str(out["0.2"]))
    _, val, _ = load_image_folder(image_folder, 0.2, 0)
    _, eval_tf = build_transforms(meta["preprocessing"])
    x = torch.stack([eval_tf(row["image"].convert("RGB")) for row in val])
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(x), torch.tensor(val["label"])).item()
    assert smooth["val_loss"] == pytest.approx(ce, rel=1e-4)


def test_find_lr_on_2_processes_restores_the_weights_exactly(image_folder, tiny_weights,
                                                             tmp_path, offline_env):
    # 30 steps: enough for the tiny model's loss to fall the 10% a suggestion needs
    base = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights,
            "--find-lr-steps", "30", "--checkpointing-steps", "no"]
    probe = tmp_path / "probe"
    proc = launch("train_finetune.py", [*base, "--find-lr", "--output-dir", probe],
                  offline_env, nproc=2)
    assert "suggested --lr" in proc.stdout
    found = json.load(open(probe / "lr_find.json"))
    assert 5 <= len(found["lr"]) <= 30 and found["suggested_lr"] > 0
    assert os.path.getsize(probe / "lr_find.png") > 0
    assert not (probe / "results.json").exists()  # --find-lr alone does not train
    # --lr auto with --epochs 0: the range test runs, then the start model is evaluated and
    # exported; it must be exactly the model of a run without the test
    runs = {}
    for name, extra in (("auto", ["--lr", "auto"]), ("plain", [])):
        runs[name] = tmp_path / name
        launch("train_finetune.py", [*base, *extra, "--epochs", "0", "--output-dir",
                                     runs[name]], offline_env, nproc=2)
    a = load_file(str(runs["auto"] / "best" / "model.safetensors"))
    b = load_file(str(runs["plain"] / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.load(open(runs["auto"] / "results.json"))["lr"] == pytest.approx(
        found["suggested_lr"])


def test_lr_auto_trains_as_if_given_the_suggested_lr(image_folder, tiny_weights, tmp_path,
                                                     offline_env):
    # 30 steps: the tiny model's loss falls 26% in them (too little in 10 for a suggestion)
    base = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights, "--epochs", "1",
            "--find-lr-steps", "30", "--checkpointing-steps", "no", "--image-size", "160"]
    auto = tmp_path / "auto"
    launch("train_finetune.py", [*base, "--lr", "auto", "--output-dir", auto], offline_env)
    res = json.load(open(auto / "results.json"))
    # a suggestion, not the fallback to the default lr
    assert res["lr"] == json.load(open(auto / "lr_find.json"))["suggested_lr"] != 0.001
    given = tmp_path / "given"
    launch("train_finetune.py", [*base, "--lr", repr(res["lr"]), "--output-dir", given],
           offline_env)
    again = json.load(open(given / "results.json"))
    assert again["final_val_loss"] == pytest.approx(res["final_val_loss"], rel=1e-6)
    assert rows(given)[0]["train_loss"] == pytest.approx(rows(auto)[0]["train_loss"], rel=1e-6)


def test_lr_suggestion_needs_a_falling_loss(tmp_path):
    lrs = [1e-7 * 10 ** i for i in range(8)]
    lr, best = suggest(lrs, [1.4, 1.3, 1.0, 0.6, 0.5, 0.7, 1.5, 3.0])
    assert best == 4 and lr == pytest.approx(lrs[4] / 10)
    # a head already trained to its minimum: the loss only rises (brain_mri, probe head:
    # minimum at the sweep's 2nd step, and its "suggestion" of 1.2e-08 trained nothing)
    assert suggest(lrs, [0.81, 0.8113, 0.82, 0.85, 0.9, 1.2, 2.0, 3.3])[0] is None
    assert suggest(lrs, [1.0, 0.95, 0.93, 0.94, 1.1, 1.5, 2.0, 4.0])[0] is None  # 7%: noise
    # the plot of a curve without a suggestion (--find-lr then tells the user to look at it)
    png = lr_find_png(lrs, [0.81, 0.8113, 0.82, 0.85, 0.9, 1.2, 2.0, 3.3], None,
                      str(tmp_path / "lr_find.png"))
    assert os.path.getsize(png) > 0
    # measured from the highest point before the minimum: an easy first batch hides nothing
    # (the tiny test model's sweep: 0.94 on its first batch, 1.2 after four, 0.90 at best)
    assert suggest(lrs, [0.94, 1.11, 1.2, 1.13, 0.9, 1.1, 1.8, 4.4])[0] == pytest.approx(
        lrs[4] / 10)


def test_lr_range_test_measures_the_fresh_head_that_trains_not_the_probes(
        image_folder, tiny_weights, tmp_path, offline_env):
    """--finetune-from random (the default): every layer trains from the heads as built, so
    the range test must sweep those; sweeping the probe's trained head (where the loss can
    only rise) gave brain_mri an lr of 1.2e-08 and a run at chance. The sweep with the probe
    on must be the sweep of a run without a probe."""
    base = ["--data-dir", image_folder, "--model", "timm:test_resnet", "--batch-size", "4",
            "--num-workers", "0", "--report-to", "none", "--weights", tiny_weights,
            "--find-lr", "--find-lr-steps", "8", "--feature-cache-dir", tmp_path / "cache"]
    curves = {}
    for name, extra in (("probe", ["--probe-epochs", "10"]), ("none", ["--probe-epochs", "0"])):
        launch("train_finetune.py", [*base, *extra, "--output-dir", tmp_path / name],
               offline_env)
        curves[name] = json.load(open(tmp_path / name / "lr_find.json"))
    assert curves["probe"]["loss"] == pytest.approx(curves["none"]["loss"], rel=1e-5)
    assert curves["probe"]["suggested_lr"] == curves["none"]["suggested_lr"]


def test_linear_probe_is_epoch_0_and_the_extractors_best_model(image_folder, tiny_weights,
                                                               tmp_path, offline_env):
    """The probe is the extractor's default recipe on the same cached features: the fine-tune's
    epoch 0 is the extractor's best model, so the fine-tune can only keep or improve on it."""
    # fp32 features: epoch 0 then takes the probe's own metrics on them (in bf16, which auto
    # picks on CPUs with native bf16, it evaluates the whole model on the val images again)
    common = ["--data-dir", image_folder, "--model", "timm:test_resnet", "--batch-size", "4",
              "--num-workers", "0", "--report-to", "none", "--weights", tiny_weights,
              "--feature-cache-dir", tmp_path / "cache", "--checkpointing-steps", "no",
              "--extract-precision", "fp32", "--image-size", "160"]  # one size for both
    launch("train_extractor.py", [*common, "--output-dir", tmp_path / "x"], offline_env)
    # the fine-tune's optimiser flags are its own: the probe keeps the extractor's
    proc = launch("train_finetune.py", [*common, "--epochs", "2", "--weight-decay", "0.5",
                                        "--momentum", "0.5", "--optimizer", "adamw",
                                        "--output-dir", tmp_path / "f"], offline_env)
    assert "features: cached in" in proc.stdout  # the extractor's cache, reused
    extractor = json.load(open(tmp_path / "x" / "results.json"))
    finetune = json.load(open(tmp_path / "f" / "results.json"))
    epochs = rows(tmp_path / "f")
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert [r["stage"] for r in epochs] == ["probe", "all-layers", "all-layers"]
    assert "Epoch 0/2: the linear probe's head" in proc.stdout  # what epoch 0 is, said
    assert epochs[0]["val_accuracy"] == extractor["best_val_accuracy"]
    assert epochs[0]["val_loss"] == pytest.approx(extractor["best_val_loss"], rel=1e-4)
    assert finetune["probe_best_epoch"] == extractor["best_epoch"]
    # (finetune >= extractor follows from the line above: epoch 0 is a candidate for best)


def test_epoch_0_takes_the_probes_metrics_which_are_the_models_on_the_images(
        image_folder, tiny_weights, tmp_path, offline_env):
    """In fp32, epoch 0's metrics come from the probe's evaluation on the cached val features
    (no second pass of the backbone over val): the same figures as evaluating the probed
    model on the val images."""
    from accelerate import Accelerator

    from common.config import parse_config
    from common.data import build_dataloaders, load_data
    from common.engine import evaluate
    from common.metrics import load_metrics
    from common.models import build_model
    from common.probe import linear_probe

    common = ["--data-dir", image_folder, "--model", "timm:test_resnet", "--batch-size", "4",
              "--num-workers", "0", "--report-to", "none", "--weights", tiny_weights,
              "--extract-precision", "fp32", "--checkpointing-steps", "no",
              "--feature-cache-dir", tmp_path / "cache", "--image-size", "160"]
    proc = launch("train_finetune.py", [*common, "--epochs", "1", "--output-dir",
                                        tmp_path / "f"], offline_env)
    assert proc.stdout.count("val Loss") == 2  # one pass over the val images: epoch 1's
    epoch_0 = rows(tmp_path / "f")[0]
    # the same probe again (the same cached features), then its model on the val images
    cfg = parse_config(FinetuneConfig, "", [*map(str, common), "--output-dir",
                                            str(tmp_path / "g")])
    accelerator = Accelerator(cpu=True)
    train, val, names = load_data(cfg, accelerator)
    network = build_model(cfg.model, len(names), cfg.pretrained, cfg.weights)
    probe = linear_probe(accelerator, cfg, network, train, val, workers=0,
                         class_weights=None, class_names=names)
    _, val_loader = build_dataloaders(train, val, network.preprocessing, cfg, 1)
    model, val_loader = accelerator.prepare(network.model, val_loader)
    on_images = evaluate(model, val_loader, load_metrics(accelerator), names,
                         accelerator=accelerator, progress=False)
    assert probe.val_metrics["accuracy"] == epoch_0["val_accuracy"] == on_images["accuracy"]
    assert torch.equal(probe.val_metrics["predictions"]["pred"],
                       on_images["predictions"]["pred"])
    assert epoch_0["val_loss"] == pytest.approx(on_images["loss"], rel=1e-4)
    assert epoch_0["val_per_class"] == on_images["per_class"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_finetune_from_random_keeps_the_probe_as_epoch_0_then_trains_as_without_it(
        nproc, image_folder, tiny_weights, tmp_path, offline_env):
    """--finetune-from random (the default): epoch 0 is the probe's model, then every layer
    trains from the heads as built: bit for bit the run without a probe, on every process."""
    common = ["--data-dir", image_folder, "--model", "timm:test_resnet", "--batch-size", "4",
              "--num-workers", "0", "--report-to", "none", "--weights", tiny_weights,
              "--epochs", "1", "--checkpointing-steps", "epoch", "--patience", "0"]
    runs = {name: tmp_path / name for name in ("random", "plain")}
    launch("train_finetune.py", [*common, "--finetune-from", "random", "--output-dir",
                                 runs["random"]], offline_env, nproc=nproc)
    launch("train_finetune.py", [*common, "--probe-epochs", "0", "--output-dir", runs["plain"]],
           offline_env, nproc=nproc)
    first = rows(runs["random"])[0]  # the probe's model, evaluated on the images
    assert first["epoch"] == 0
    assert first["val_accuracy"] == json.load(open(runs["random"] / "results.json"))[
        "probe_val_accuracy"]  # (the probe's own figure, on the cached features)
    # without the restart, every layer would train from the probe's head: other weights
    weights = {k: checkpoint_weights(v)[-1] for k, v in runs.items()}
    assert weights["random"].keys() == weights["plain"].keys()
    for k, v in weights["random"].items():
        assert torch.equal(v, weights["plain"][k]), k


def test_patience_stops_after_n_evaluations_without_a_better_metric_and_keeps_the_best(
        image_folder, tmp_path, offline_env):
    # lr 1e-12: the weights, hence val accuracy, cannot change, so epoch 1 stays the best
    # (the first that sets it) and --patience 2 ends the 10-epoch run after epoch 3
    out = tmp_path / "run"
    launch("train_extractor.py", ["--data-dir", image_folder, *TINY[:-2], "--no-pretrained",
                                  "--lr", "1e-12", "--epochs", "10", "--patience", "2",
                                  "--output-dir", out], offline_env)
    res = json.load(open(out / "results.json"))
    epochs = [r["epoch"] for r in rows(out)]
    assert res["stopped_early_after_epoch"] == epochs[-1] == res["best_epoch"] + 2, (res, epochs)
    assert epochs[-1] < 10
    best = [r for r in rows(out) if r["epoch"] == res["best_epoch"]][0]
    assert res["best_val_accuracy"] == best["val_accuracy"] == max(r["val_accuracy"]
                                                                   for r in rows(out))


def test_ema_warms_up_its_decay_and_a_reloaded_average_continues_the_same():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    steps = [torch.randn_like(net[0].weight) for _ in range(6)]
    ema, expected = ModelEma(net, 0.9), net[0].weight.detach().clone()
    for t, delta in enumerate(steps):
        with torch.no_grad():
            net[0].weight += delta
        net(torch.randn(4, 3))  # BatchNorm's integer counter moves too
        ema.update(net)
        if t == 3:  # a checkpoint: a new average loaded from it continues the same
            reloaded = ModelEma(net, 0.9)  # the count comes from the train state
            reloaded.load_state_dict(ema.state_dict(), updates=ema.updates)
            # a checkpoint of the earlier format (torch's AveragedModel: keys under
            # `module.`, the count as `n_averaged`) continues the same
            old = ModelEma(net, 0.9)
            old.load_state_dict({"n_averaged": torch.tensor(ema.updates),
                                 **{f"module.{k}": v for k, v in ema.state_dict().items()}})
            assert old.updates == ema.updates == 4
        elif t > 3:
            reloaded.update(net)
            old.update(net)
        # the first update copies; the t-th after it keeps ema_decay(0.9, t) of the average
        d = 0.0 if t == 0 else ema_decay(0.9, t)
        expected = d * expected + (1 - d) * net[0].weight.detach()
        assert torch.allclose(ema.module[0].weight, expected, atol=1e-6), t
    assert ema_decay(0.9, 1) < 0.5 and ema_decay(0.9, 150) == 0.9  # warms up, then holds
    assert ema_decay(0.998, 150) == pytest.approx(0.977, abs=1e-3)
    assert torch.equal(reloaded.module[0].weight, ema.module[0].weight)
    assert torch.equal(old.module[0].weight, ema.module[0].weight)
    assert ema.module[1].num_batches_tracked.item() == 6  # integer buffers: the latest value


def test_model_ema_is_evaluated_checkpointed_and_resumed_exactly(image_folder, tiny_weights,
                                                                 tmp_path, offline_env):
    args = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights, "--epochs", "3",
            "--checkpoints-total-limit", "0", "--model-ema", "--model-ema-decay", "0.9"]
    full = tmp_path / "full"
    launch("train_finetune.py", [*args, "--output-dir", full], offline_env)
    assert all("ema_val_accuracy" in r for r in rows(full) if r["epoch"] > 0)
    # best/ holds the weights that scored best: results and model.json name the same source,
    # and the best figures are that source's at the best epoch
    res = json.load(open(full / "results.json"))
    assert json.load(open(full / "best" / "model.json"))["weights"] == res["best_weights"]
    row = next(r for r in rows(full) if r["epoch"] == res["best_epoch"])
    prefix = "ema_val_" if res["best_weights"] == "ema" else "val_"
    assert res["best_val_loss"] == pytest.approx(row[prefix + "loss"], rel=1e-9)
    assert res["best_val_accuracy"] == row[prefix + "accuracy"]
    folders = sorted(glob.glob(str(full / "checkpoints" / "step-*")),
                     key=lambda p: int(p.rsplit("-", 1)[1]))
    resumed = tmp_path / "resumed"
    launch("train_finetune.py", [*args, "--output-dir", resumed,
                                 "--resume-from-checkpoint", folders[0]], offline_env)
    assert [r["ema_val_loss"] for r in rows(resumed)] == \
        pytest.approx([r["ema_val_loss"] for r in rows(full)][1:], rel=1e-5)
    # the average goes on with the same decay: its update count came back with it
    last = os.path.basename(folders[-1])
    ea, eb = (load_file(os.path.join(out, "checkpoints", last, "ema.safetensors"))
              for out in (full, resumed))
    ua, ub = (json.load(open(os.path.join(out, "checkpoints", last, "train_state.json")))
              ["train_state"]["ema_updates"] for out in (full, resumed))
    assert ua == ub > 0
    assert all(torch.allclose(ea[k].float(), eb[k].float(), rtol=1e-5, atol=1e-7) for k in ea)


def test_the_probe_the_lr_range_test_and_the_epochs_train_through_the_one_step(
        monkeypatch, image_folder, tiny_weights, tmp_path, offline_env):
    """One step function for every run: the linear probe's heads (outside Accelerate), the LR
    range test and the epochs all train through engine.train_step; no other loop trains."""
    from common import engine

    calls = []
    step = engine.train_step

    def counted(*args, **kwargs):
        calls.append("probe" if kwargs.get("accelerator") is None else "prepared")
        return step(*args, **kwargs)

    monkeypatch.setattr(engine, "train_step", counted)
    args = ["--data-dir", image_folder, *TINY, "--weights", tiny_weights, "--report-to", "none",
            "--feature-cache-dir", tmp_path / "cache"]
    # 18 train images at batch 4: 5 batches an epoch
    launch("train_finetune.py", [*args, "--probe-epochs", "3", "--epochs", "2",
                                 "--output-dir", tmp_path / "a"], offline_env)
    assert calls.count("probe") == 3 * 5 and calls.count("prepared") == 2 * 5, calls
    calls.clear()
    launch("train_finetune.py", [*args, "--probe-epochs", "0", "--find-lr",
                                 "--find-lr-steps", "12", "--output-dir", tmp_path / "b"],
           offline_env)
    # every step of the sweep (12, or fewer where the loss diverged first; 5 at the least)
    assert set(calls) == {"prepared"} and 5 <= len(calls) <= 12, calls
    assert os.path.exists(tmp_path / "b" / "lr_find.json")
