"""What the BatchNorm fold does to what the extractor learns.

    python benchmarks/fold_accuracy.py [--sets hymenoptera_data,clothing,rice_leaf,brain_mri,hotdog]

`train_extractor.py` with its defaults (seed 0, a cold feature cache) on each of the suite's
sets, three ways, one after the other: `--extract-precision bf16` as shipped (the forward on
the copy with the BatchNorm layers folded into the convolutions, common/folding.py); bf16 on
timm's model as it is (the fold turned off in the script's process); and fp32 (never
folded: the backbone's own numbers). Prints each run's best val accuracy, in images, and its
extraction speed (img/s, from results.json), so that the fold's rounding can be set beside
bf16's own: the question is whether the folded bf16 features lose accuracy that the plain
bf16 ones keep.
"""

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
SETS = "hymenoptera_data,clothing,rice_leaf,brain_mri,hotdog"
VARIANTS = {"bf16 folded": ["--extract-precision", "bf16"],
            "bf16 unfolded": ["--extract-precision", "bf16"],
            "fp32": ["--extract-precision", "fp32"]}


def child(variant, argv):
    """train_extractor.py in this process, the fold turned off for "bf16 unfolded"."""
    import common.features

    if variant == "bf16 unfolded":
        common.features.fold_batchnorm = lambda model, example: model
    sys.argv = [os.path.join(REPO, "train_extractor.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run(variant, data, tmp):
    out = os.path.join(tmp, "run")
    argv = ["--data-dir", data, "--output-dir", out, "--seed", "0", "--report-to", "none",
            "--feature-cache-dir", os.path.join(tmp, "cache"), *VARIANTS[variant]]
    subprocess.run([sys.executable, __file__, "--child", variant, "--", *argv], check=True,
                   capture_output=True, cwd=REPO,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
    return json.load(open(os.path.join(out, "results.json")))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=SETS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(args.child, rest[1:] if rest[:1] == ["--"] else rest)
    print(f"machine: {describe()}", flush=True)
    for name in args.sets.split(","):
        cells = []
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as tmp:
                res = run(variant, os.path.join(SHARED, "data", name), tmp)
            assert res["batchnorm_folded"] == (variant == "bf16 folded"), res
            n = res["val_samples"]
            cells.append(f"{variant} {round(res['best_val_accuracy'] * n)}/{n} "
                         f"({res['extract_images_per_second']:.1f} img/s)")
        print(f"{name}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
