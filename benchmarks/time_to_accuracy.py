"""Time to accuracy: our defaults against the tutorial's recipe, side by side, same backbone
and weights, on the ants/bees set. Prints best val accuracy, wall time and their ratios.

    python benchmarks/time_to_accuracy.py --script extractor          # ~8 min on 2 CPU cores
    python benchmarks/time_to_accuracy.py --script finetune           # ~17 min on 2 CPU cores
    python benchmarks/time_to_accuracy.py --script finetune --seeds 0,1,2   # mean over seeds
    python benchmarks/time_to_accuracy.py --script finetune --recipes tutorial --seeds 0,1,2

Each run is `accelerate launch --config_file accelerate_configs/cpu.yaml <script> ...` in a
fresh process; wall time is the whole process (start-up, data, extraction, training, eval),
and results.json's own wall_seconds (from the script's start) is printed beside it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
TUTORIAL = ["--batch-size", "4", "--lr", "0.001", "--momentum", "0.9", "--scheduler", "step",
            "--step-size", "7", "--gamma", "0.1", "--epochs", "25", "--no-channels-last",
            "--optimizer", "sgd", "--weight-decay", "0", "--warmup-epochs", "0",
            "--label-smoothing", "0", "--checkpointing-steps", "no"]
FINETUNE_TUTORIAL = TUTORIAL + ["--freeze-epochs", "0", "--backbone-lr-mult", "1"]
RECIPES = {
    "extractor": {"tutorial": TUTORIAL + ["--no-cache-features", "--feature-views", "1"],
                  "defaults": []},
    "finetune": {"tutorial": FINETUNE_TUTORIAL, "defaults": []},
}


def run(script, args, out, config):
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", config, os.path.join(REPO, f"train_{script}.py"), *args,
           "--output-dir", out, "--report-to", "none"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        return wall, json.load(fh)


def main():
    from machine import describe

    print(f"machine: {describe()}", flush=True)
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--script", choices=["extractor", "finetune", "both"], default="both")
    p.add_argument("--model", default="timm:tf_efficientnet_lite0")
    p.add_argument("--weights", default=os.path.join(
        SHARED, "weights", "tf_efficientnet_lite0.in1k.safetensors"))
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data", "hymenoptera_data"))
    p.add_argument("--config", default=os.path.join(REPO, "accelerate_configs", "cpu.yaml"))
    p.add_argument("--recipes", default="tutorial,defaults",
                   help="comma-separated subset of: tutorial, defaults")
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds (default: each script's own default seed)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scripts = ["extractor", "finetune"] if args.script == "both" else [args.script]
    base = ["--data-dir", args.data_dir, "--model", args.model, "--weights", args.weights]
    recipes = args.recipes.split(",")
    seeds = args.seeds.split(",") if args.seeds else [None]
    with tempfile.TemporaryDirectory() as tmp:
        for script in scripts:
            rows = {name: [] for name in recipes}
            for seed in seeds:
                for name in recipes:
                    extra = list(RECIPES[script][name])
                    if seed is not None:
                        extra += ["--seed", seed]
                    tag = f"{script}-{name}-{seed}"
                    if script == "extractor":  # a cold cache: extraction is part of the time
                        extra += ["--feature-cache-dir", os.path.join(tmp, "cache-" + tag)]
                    wall, res = run(script, base + extra, os.path.join(tmp, tag), args.config)
                    rows[name].append((wall, res))
                    print(f"{script:9s} {name:8s} seed {seed or 'default':7s} best val acc "
                          f"{res['best_val_accuracy']:.4f} (epoch {res['best_epoch']}/"
                          f"{res['epochs']})  process {wall:7.1f} s  in-script "
                          f"{res['wall_seconds']:7.1f} s", flush=True)
            mean = {name: (sum(r["best_val_accuracy"] for _, r in v) / len(v),
                           sum(w for w, _ in v) / len(v),
                           sum(r["wall_seconds"] for _, r in v) / len(v))
                    for name, v in rows.items()}
            for name, (acc, wall, inscript) in mean.items():
                print(f"{script:9s} {name:8s} mean over {len(seeds)} seed(s): best val acc "
                      f"{acc:.4f}, process {wall:.1f} s, in-script {inscript:.1f} s", flush=True)
            if "tutorial" in mean and "defaults" in mean:
                (ta, tw, ti), (da, dw, di) = mean["tutorial"], mean["defaults"]
                print(f"{script:9s} defaults/tutorial: accuracy {da:.4f} vs {ta:.4f} "
                      f"({'>=' if da >= ta else '<'}), time ratio process {dw / tw:.3f} "
                      f"(1/{tw / dw:.1f}), in-script {di / ti:.3f} (1/{ti / di:.1f})",
                      flush=True)

if __name__ == "__main__":
    main()
