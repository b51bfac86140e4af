"""Defaults judged on many datasets: both scripts, named recipes, several seeds, one table.

    python benchmarks/suite.py                                  # defaults + baselines, 5 sets
    python benchmarks/suite.py --recipes finetune,plain --seeds 0,1 --data ../shared/data/hotdog
    python benchmarks/suite.py --recipe "ema=finetune:--model-ema" --recipes finetune,ema
    python benchmarks/suite.py --accelerate-config accelerate_configs/single_gpu.yaml  # a GPU

Each run is `accelerate launch --config_file accelerate_configs/cpu.yaml train_<script>.py
--data-dir SET --seed S --report-to none` (another config with --accelerate-config) plus the
recipe's flags, in a fresh process, one at a time, with a cold feature cache of its own (so
no run is faster for another's work). The table gives, per set and recipe: best val accuracy
(mean over seeds, and min-max), its 95% Wilson interval on that set's val images (how much one
set can tell), the best epoch, and the process wall time; then each recipe's mean and worst
case over the sets. Results of every run go to --json, which a later invocation resumes.

Recipes (NAME=SCRIPT:FLAGS adds one; see RECIPES below):
- finetune, extractor: each script's defaults
- sgd-finetune: the fine-tune defaults until 2026-11-30 (SGD lr 0.01 in place of AdamW
  lr 0.001, weight decay 0.05; all else the same)
- tutorial-finetune, tutorial-extractor: the PyTorch tutorial's recipe (batch 4, SGD 1e-3,
  StepLR 7/0.1, 25 epochs; the extractor runs the backbone on every image every epoch)
- lpft: the fine-tune defaults until 2026-11-29 (LP-FT: every layer from the probe's head,
  backbone at 0.1x, BatchNorm statistics kept, label smoothing 0.1, --patience 5)
- previous-finetune: the fine-tune defaults before the suite (ddb529f: 1 head-only + 3 epochs)
- plain: every layer from a random head, SGD lr 0.01, cosine, 10 epochs
- plain-matched: the same, given the finetune defaults' wall time on that set and seed: their
  epochs plus as many as their probe and its evaluation took (needs finetune in the same run,
  earlier in --recipes)
- fastai: fastai's `fine_tune(5)` with the same pretrained weights (benchmarks/fastai_recipe.py,
  run by --fastai-python); skipped, with a line saying so, where fastai is not installed
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from common.metrics import wilson_interval  # noqa: E402
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
SETS = ("hymenoptera_data", "clothing", "rice_leaf", "brain_mri", "hotdog")

# each SGD recipe names --optimizer sgd: the fine-tune's default is AdamW since 2026-11-30
PLAIN = "--probe-epochs 0 --freeze-epochs 0 --backbone-lr-mult 1 --label-smoothing 0 " \
        "--optimizer sgd --lr 0.01 --scheduler cosine --patience 0 --no-bn-eval"
RECIPES = {
    "finetune": ("finetune", ""),
    "extractor": ("extractor", ""),
    "sgd-finetune": ("finetune", "--optimizer sgd"),
    "tutorial-finetune": ("finetune", "--batch-size 4 --optimizer sgd --lr 0.001 "
                          "--scheduler step --step-size 7 --gamma 0.1 --epochs 25 "
                          "--probe-epochs 0 --freeze-epochs 0 "
                          "--backbone-lr-mult 1 --label-smoothing 0 --patience 0 --no-bn-eval"),
    "tutorial-extractor": ("extractor", "--batch-size 4 --lr 0.001 --scheduler step "
                           "--step-size 7 --gamma 0.1 --epochs 25 --no-cache-features "
                           "--feature-views 25"),
    "lpft": ("finetune", "--optimizer sgd --finetune-from probe --backbone-lr-mult 0.1 "
                         "--bn-eval --label-smoothing 0.1 --patience 5"),
    "previous-finetune": ("finetune", "--epochs 4 --freeze-epochs 1 --probe-epochs 0 "
                          "--backbone-lr-mult 0.1 --label-smoothing 0.1 --optimizer sgd "
                          "--lr 0.01 --patience 0 --no-bn-eval"),
    "plain": ("finetune", f"{PLAIN} --epochs 10"),
    "plain-matched": ("finetune", PLAIN),  # --epochs from the finetune defaults' wall time
    "fastai": ("fastai", ""),  # not our scripts: benchmarks/fastai_recipe.py
}


def run_fastai(data, seed, workdir, python):
    """fastai's fine_tune(5) on `data` in a fresh process (None: fastai not installed)."""
    out = os.path.join(workdir, "fastai.json")
    cmd = [python, os.path.join(HERE, "fastai_recipe.py"), "--data", data, "--seed",
           str(seed), "--json", out]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.time() - t0
    if proc.returncode == 3:  # fastai_recipe.NO_FASTAI
        return None
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(out) as fh:
        res = json.load(fh)
    return dict(res, process_seconds=round(wall, 1), script_seconds=res["wall_seconds"],
                flags="fine_tune(5)")


def run_one(script, flags, data, seed, model_args, workdir, threads, config):
    out = os.path.join(workdir, "run")
    shutil.rmtree(out, ignore_errors=True)
    cache = tempfile.mkdtemp(prefix="cache-", dir=workdir)
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", config,
           *(["--num_cpu_threads_per_process", str(threads)] if threads else []),
           os.path.join(REPO, f"train_{script}.py"), "--data-dir", data, "--seed", str(seed),
           "--output-dir", out, "--report-to", "none", "--feature-cache-dir", cache,
           *model_args, *flags.split()]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
    wall = time.time() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    epoch_seconds = [r["seconds"] for r in rows if r["epoch"] > 0]
    # what the run spent before its first training epoch that a run without a probe does not:
    # the probe (extraction included) and its evaluation as epoch 0
    start_seconds = res.get("probe_seconds", 0.0) + sum(r["seconds"] for r in rows
                                                        if r["epoch"] == 0)
    return dict(best_val_accuracy=res["best_val_accuracy"], best_epoch=res["best_epoch"],
                epochs=res["epochs"], val_samples=res["val_samples"],
                train_samples=res["train_samples"], process_seconds=round(wall, 1),
                script_seconds=res["wall_seconds"], stopped_early=res.get(
                    "stopped_early_after_epoch"),
                mean_epoch_seconds=sum(epoch_seconds) / max(len(epoch_seconds), 1),
                start_seconds=round(start_seconds, 1),
                # per epoch (0: the probe): what --patience N would have kept and saved is
                # read off these, the schedule not depending on it
                val_accuracy_by_epoch=[r["val_accuracy"] for r in rows],
                # --model-ema: the average's own val accuracy per epoch (epoch 0 has none), so
                # a reader can tell its gain from the best of two evaluations per epoch
                **({"ema_val_accuracy_by_epoch": [r.get("ema_val_accuracy") for r in rows]}
                   if any("ema_val_accuracy" in r for r in rows) else {}),
                seconds_by_epoch=[round(r["seconds"], 1) for r in rows], flags=flags)


def machine_tag(runs, machines):
    """' [m1]' after a row whose runs ran on the 2nd machine of several; '' with one."""
    if len(machines) < 2:
        return ""
    return " " + "".join(f"[m{machines.index(m)}]" for m in
                         dict.fromkeys(x["machine"] for x in runs))


def summarise(results, sets, recipes):
    # wall times compare only within one machine: name it where a file holds several
    machines = list(dict.fromkeys(x["machine"] for s in sets for r in recipes
                                  for x in results.get(s, {}).get(r, [])))
    lines = []
    head = f"{'set':18s} {'recipe':20s} {'best val acc':>12s} {'min-max':>13s} " \
           f"{'95% CI (val)':>13s} {'epoch':>5s} {'wall s':>7s}"
    lines += [head, "-" * len(head)]
    per_recipe = {r: [] for r in recipes}
    for s in sets:
        for r in recipes:
            runs = results.get(s, {}).get(r, [])
            if not runs:
                continue
            accs = [x["best_val_accuracy"] for x in runs]
            mean = sum(accs) / len(accs)
            n = runs[0]["val_samples"]
            low, high = wilson_interval(round(mean * n), n)
            per_recipe[r].append(mean)
            lines.append(f"{s:18s} {r:20s} {mean:12.4f} {min(accs):6.3f}-{max(accs):.3f} "
                         f"{low:6.3f}-{high:.3f} "
                         f"{sum(x['best_epoch'] for x in runs) / len(runs):5.1f} "
                         f"{sum(x['process_seconds'] for x in runs) / len(runs):7.0f}"
                         f"{machine_tag(runs, machines)}")
        lines.append("")
    if len(machines) > 1:  # a suite resumed on another machine: whose wall time is whose
        lines += [f"[m{i}] {m}" for i, m in enumerate(machines)] + [""]
    lines.append(f"{'recipe':20s} {'mean over sets':>14s} {'worst set':>10s} {'sets':>5s}")
    for r, means in per_recipe.items():
        if means:
            lines.append(f"{r:20s} {sum(means) / len(means):14.4f} {min(means):10.4f} "
                         f"{len(means):5d}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=[os.path.join(SHARED, "data", s)
                                                       for s in SETS])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--recipes", default="finetune,extractor,sgd-finetune,"
                                             "previous-finetune,plain-matched,tutorial-finetune")
    parser.add_argument("--recipe", action="append", default=[],
                        help="NAME=SCRIPT:FLAGS, e.g. 'ema=finetune:--model-ema'")
    parser.add_argument("--model-args", default="", help="e.g. '--model timm:NAME --weights F'"
                        " (default: the scripts' default model)")
    parser.add_argument("--json", default="suite.json")
    parser.add_argument("--accelerate-config", default=os.path.join(REPO, "accelerate_configs",
                                                                    "cpu.yaml"),
                        help="e.g. accelerate_configs/single_gpu.yaml on a GPU (wall times "
                             "are only comparable within one machine and config)")
    parser.add_argument("--fastai-python", default=sys.executable,
                        help="the Python that runs the fastai recipe (one with fastai "
                             "installed: it is a benchmark-only dependency)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: "
                        "accelerate's default, all cores); 1 lets two suites share 2 cores "
                        "without slowing each other down more than half")
    args = parser.parse_args()
    for spec in args.recipe:
        name, _, rest = spec.partition("=")
        script, _, flags = rest.partition(":")
        RECIPES[name] = (script, flags)
    recipes = args.recipes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"machine: {describe()}", flush=True)
    results = {}
    if os.path.exists(args.json):  # resume an interrupted suite: keep what was measured
        with open(args.json) as fh:
            saved = json.load(fh)
        results = saved.get("results", {})
        for runs in (runs for by_recipe in results.values() for runs in by_recipe.values()):
            for r in runs:  # files written before each run named its own machine
                r.setdefault("machine", saved.get("machine", "unknown"))
    workdir = tempfile.mkdtemp(prefix="suite-")
    sets = [os.path.basename(os.path.normpath(d)) for d in args.data]
    for data, name in zip(args.data, sets):
        for recipe in recipes:
            script, flags = RECIPES[recipe]
            done = results.setdefault(name, {}).setdefault(recipe, [])
            # by seed, not by count: a file holding seed 0 resumed with --seeds 1,2 runs both
            for seed in [s for s in seeds if s not in {r.get("seed") for r in done}]:
                if recipe == "plain-matched":
                    ref = next((r for r in results[name].get("finetune", [])
                                if r.get("seed") == seed), None)
                    if ref is None:
                        sys.exit(f"suite.py: plain-matched on {name}, seed {seed} needs the "
                                 f"finetune run of that seed first: list finetune before it "
                                 f"in --recipes")
                    # the same wall time: the defaults' epochs plus as many as their probe
                    # took (start-up and export are paid by both runs alike)
                    epochs = ref["epochs"] + round(ref["start_seconds"]
                                                   / ref["mean_epoch_seconds"])
                    flags = f"{RECIPES[recipe][1]} --epochs {epochs}"
                if script == "fastai":
                    r = run_fastai(data, seed, workdir, args.fastai_python)
                    if r is None:
                        print(f"fastai recipe skipped: fastai is not installed for "
                              f"{args.fastai_python} (pip install fastai, or "
                              "--fastai-python PATH)", flush=True)
                        break
                else:
                    r = run_one(script, flags, data, seed, args.model_args.split(), workdir,
                                args.threads, args.accelerate_config)
                r["seed"], r["machine"] = seed, describe()  # resumes may change machine
                done.append(r)
                print(f"{name:18s} {recipe:20s} seed {seed}: best val acc "
                      f"{r['best_val_accuracy']:.4f} (epoch {r['best_epoch']}/{r['epochs']}), "
                      f"{r['process_seconds']:.0f} s", flush=True)
                with open(args.json, "w") as fh:
                    json.dump(dict(machine=describe(), seeds=seeds, results=results), fh,
                              indent=1)
    shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(summarise(results, sets, recipes))


if __name__ == "__main__":
    main()
