"""The fine-tune's schedule and image size on a larger set: one run per configuration, one
after another on a quiet machine, each its own `accelerate launch` of train_finetune.py.

    python benchmarks/schedule_at_scale.py                    # ../shared/data/cifar10
    python benchmarks/schedule_at_scale.py --configs "224:1,auto:3,auto:5,96:4" --data DIR

A configuration is `SIDE:EPOCHS` (`--image-size SIDE --epochs EPOCHS`; `auto` for either
takes the script's default). Prints, per run: the side and epochs it ran, optimiser steps,
best val accuracy (and images), wall time, where it went (feature extraction and probe,
training, evaluations: results.json and metrics.jsonl), images/s of the whole run, and the
peak memory of the training process. Results go to --json as they arrive.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
sys.path.insert(0, HERE)
from machine import describe  # noqa: E402


def run(data, side, epochs, out, config, extra):
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", config, os.path.join(REPO, "train_finetune.py"), "--data-dir", data,
           "--image-size", side, "--epochs", epochs, "--report-to", "none", "--output-dir", out,
           *extra]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    process_seconds = time.time() - t0
    res = json.load(open(os.path.join(out, "results.json")))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    model = json.load(open(os.path.join(out, "best", "model.json")))
    train_s = sum(r.get("train_seconds", 0) for r in rows)
    eval_s = sum(r["seconds"] - r.get("train_seconds", 0) for r in rows if "seconds" in r)
    seen = res["train_samples"] * max(len(rows) - 1, 0) + res["val_samples"] * len(rows)
    return dict(side=model["preprocessing"]["input_size"], epochs=res["epochs"],
                steps=res["optimizer_steps"], accuracy=res["best_val_accuracy"],
                correct=round(res["best_val_accuracy"] * res["val_samples"]),
                val=res["val_samples"], wall=res["wall_seconds"], process=process_seconds,
                probe=res.get("probe_seconds"), train=train_s, evaluations=eval_s,
                images_per_second=seen / res["wall_seconds"], peak_rss_mb=res["peak_rss_mb"],
                best_epoch=res["best_epoch"], curve=[r.get("val_accuracy") for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(SHARED, "data", "cifar10"))
    parser.add_argument("--configs", default="224:1,auto:auto,auto:5")
    parser.add_argument("--out", default="/tmp/schedule_at_scale")
    parser.add_argument("--json", default="schedule_at_scale.json")
    parser.add_argument("--accelerate-config",
                        default=os.path.join(REPO, "accelerate_configs", "cpu.yaml"))
    parser.add_argument("--extra", default="", help="more train_finetune.py flags")
    args = parser.parse_args()
    results = []
    print(f"machine: {describe()}", flush=True)
    print("side epochs steps  accuracy (images)  wall s  probe s  train s  eval s  img/s  "
          "peak MB  curve")
    for config in args.configs.split(","):
        side, epochs = config.split(":")
        r = run(args.data, side, epochs, os.path.join(args.out, config.replace(":", "-")),
                args.accelerate_config, args.extra.split())
        results.append(dict(config=config, **r))
        print(f"{r['side']:4d} {r['epochs']:6} {r['steps']:5d}  {r['accuracy']:.4f} "
              f"({r['correct']}/{r['val']})  {r['wall']:6.0f}  {r['probe'] or 0:7.0f}  "
              f"{r['train']:7.0f}  {r['evaluations']:6.0f}  {r['images_per_second']:5.1f}  "
              f"{r['peak_rss_mb']:7.0f}  {[round(c, 4) for c in r['curve']]}", flush=True)
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
