"""Start-up: what the scripts import, and the seconds from process start to the first step.

    python benchmarks/startup.py                       # both scripts, hotdog, 3 runs each
    python benchmarks/startup.py --runs 5 --data-dir ../shared/data/hymenoptera_data

1. `python -X importtime SCRIPT --help` (every import at the top of the script, then argparse
   exits): the total, the packages that take longest (their modules' own time), and whether
   any module that should wait until it is used (wandb, evaluate, scipy, matplotlib, sklearn,
   pandas) was imported.
2. Seconds from process start to the first optimiser step, started with `python`, with
   `accelerate launch` and with `accelerate-launch` (the same launcher, Accelerate's own
   console script for it): the process's start to the script's first line (measured with
   a one-line script that prints the time, the same launcher and interpreter) plus
   results.json's `first_step_seconds` (the script's first line to the end of its first
   optimiser step). Runs: `train_finetune.py --probe-epochs 0` (the probe is training,
   not start-up) and `train_extractor.py` with a warm feature cache (its first run
   extracts: that is the data's cost, reported by extract_speed.py), each `--max-train-
   steps 1 --epochs 1`, median of --runs. Quiet machine, one process at a time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from machine import describe  # noqa: E402

SHARED = os.environ.get("TL_SHARED_DIR", os.path.join(REPO, "..", "shared"))
LAZY = ("wandb", "evaluate", "scipy", "matplotlib", "sklearn", "pandas")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled")


def import_seconds(script):
    """Seconds of import per root package (each module's own time, summed over every
    nesting: torch's modules count for torch whoever imported them), and which of LAZY
    were imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", script, "--help"],
                          capture_output=True, text=True, env=ENV, cwd=REPO)
    per_root, loaded = {}, set()
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        self_us, _, name = line[len("import time:"):].split("|")
        root = name.strip().split(".")[0]
        per_root[root] = per_root.get(root, 0) + int(self_us)
        if root in LAZY:
            loaded.add(root)
    return per_root, loaded


# how a script is started: the bare interpreter; Accelerate's launcher as the README starts
# it; the same launcher through its own console script, which skips importing the
# `accelerate` CLI's other commands (its estimate-memory command imports timm)
LAUNCHERS = ("python", "accelerate launch", "accelerate-launch")


def _command(path, how):
    """`path` started by launcher `how` (LAUNCHERS), with the one-process CPU config."""
    if how == "python":
        return [sys.executable, path]
    return [os.path.join(os.path.dirname(sys.executable), how.split()[0]), *how.split()[1:],
            "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml"), path]


def launcher(how):
    """Process start to a script's first line, under the same launcher and interpreter."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write("import time; print(time.time())\n")
    cmd = _command(fh.name, how)
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, check=True).stdout
    os.unlink(fh.name)
    return float(out.strip().splitlines()[-1]) - t0


def first_step(script, data, out, cache, how):
    flags = ["--data-dir", data, "--output-dir", out, "--feature-cache-dir", cache,
             "--report-to", "none", "--epochs", "1", "--max-train-steps", "1",
             "--checkpointing-steps", "no", "--overwrite-output-dir"]
    if script == "finetune":
        flags += ["--probe-epochs", "0"]
    cmd = _command(os.path.join(REPO, f"train_{script}.py"), how)
    proc = subprocess.run(cmd + flags, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd + flags)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)["first_step_seconds"]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.join(SHARED, "data", "hotdog"))
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    print(f"machine: {describe()}", flush=True)
    for script in ("train_finetune.py", "train_extractor.py"):
        top, loaded = import_seconds(script)
        heavy = sorted(top.items(), key=lambda kv: -kv[1])[:8]
        print(f"{script} imports: {sum(top.values()) / 1e6:.2f} s; heaviest: "
              + ", ".join(f"{k} {v / 1e6:.2f}" for k, v in heavy)
              + "; imported before use: "
              + (", ".join(sorted(loaded)) or "none of " + ", ".join(LAZY)))
    with tempfile.TemporaryDirectory() as tmp:
        for how in LAUNCHERS:
            gap = statistics.median(launcher(how) for _ in range(args.runs))
            print(f"{how}: process start to the script's first line {gap:.2f} s", flush=True)
            for script in ("finetune", "extractor"):
                cache = os.path.join(tmp, f"cache-{script}")
                if script == "extractor":  # warm the feature cache: extraction is not start-up
                    first_step(script, args.data_dir, os.path.join(tmp, "warm"), cache, how)
                steps = [first_step(script, args.data_dir, os.path.join(tmp, f"r{i}"), cache,
                                    how) for i in range(args.runs)]
                s = statistics.median(steps)
                print(f"{how} train_{script}.py: first line to first step {s:.2f} s "
                      f"(min {min(steps):.2f}, max {max(steps):.2f}); process start to first "
                      f"step {gap + s:.2f} s", flush=True)


if __name__ == "__main__":
    main()
