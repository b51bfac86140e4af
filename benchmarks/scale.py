"""Start-up and memory as the data grows: 1k, 10k, 100k small JPEGs, as an image folder and
as a parquet dataset with the image bytes embedded (as Hub datasets store them).

    python benchmarks/scale.py                         # both scripts, 1k/10k/100k, ~40 min here
    python benchmarks/scale.py --sizes 2000,20000 --kinds parquet --scripts finetune
    python benchmarks/scale.py --sizes 10000,100000 --warm-only   # second runs again

For each size, kind and script: two runs of the same command (the first with every cache
cold, the second reusing the image-check verdicts, the datasets cache and the features),
each `accelerate launch ... --max-train-steps 20` so that it measures start-up, not the
whole epoch (`--evaluate-only`: `--epochs 0`, load, check and evaluate). Reported per run:
seconds from the script's first line to its first optimiser step (results.json
`first_step_seconds`), the process wall time, peak RSS of the training process
(`peak_rss_mb`), the peak anonymous memory of the whole process tree (launcher, training
process, loader and image-check workers: the sum of their Pss_Anon, sampled every 50 ms, so
pages shared after a fork count once and the page cache, which max RSS counts, does not),
and the training loop's images/s. The model is timm's tiny `test_resnet` (random weights):
what grows with the data is the start-up, not the model.
Targets: from 10k to 100k images, peak RSS grows by at most 150 MB, and the second run
reaches its first step within 10 s more; the first run's anonymous peak within ~100 MB of
the second's, from 2k to 20k images.

    python benchmarks/scale.py --sizes 2000,20000 --kinds parquet --scripts finetune \
        --evaluate-only --side 96 --val-images 200   # first contact: anonymous memory
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from machine import describe  # noqa: E402

CLASSES = ("a", "b", "c", "d")


SIDE = 48  # image height; width 4/3 of it (--side: 48 gives ~2-3 KB, 96 ~9 KB)
VAL = None  # --val-images: a fixed number of val images (else every tenth group of 4)


def is_val(i):
    return i < VAL if VAL is not None else (i // 4) % 10 == 0  # every class has val images


def jpeg(i):
    """A small photo-like JPEG: a colour per class, noise per image."""
    rng = np.random.default_rng(i)
    base = np.array([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)][i % 4])
    arr = np.clip(base + rng.normal(0, 30, (SIDE, SIDE * 4 // 3, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_folder(root, n):
    if os.path.isdir(root):
        return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        split = "val" if is_val(i) else "train"
        d = os.path.join(tmp, split, CLASSES[i % 4])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as fh:
            fh.write(jpeg(i))
    os.replace(tmp, root)
    return root


def make_parquet(root, n):
    if os.path.isdir(root):
        return root
    import datasets

    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    for split, name in (("train", "train"), ("val", "validation")):
        idx = [i for i in range(n) if is_val(i) == (split == "val")]
        for part, start in enumerate(range(0, len(idx), 20000)):  # files of 20k rows
            chunk = idx[start:start + 20000]
            ds = datasets.Dataset.from_dict(
                {"image": [{"bytes": jpeg(i), "path": None} for i in chunk],
                 "label": [CLASSES[i % 4] for i in chunk]}, features=features)
            ds.to_parquet(os.path.join(tmp, f"{name}-{part:05d}.parquet"))
    os.replace(tmp, root)
    return root


def _tree(pid):
    """`pid` and all its descendants (Linux /proc)."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as fh:
                pids += [int(c) for c in fh.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def _anon_kb(pid):
    """Pss_Anon of one process (kB): its private anonymous pages, and its share of those it
    shares with forked relatives; no page cache, no mapped files."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonPeak(threading.Thread):
    """Samples the anonymous memory of a process tree every 50 ms; `.peak_mb` when done."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak_kb = max(self.peak_kb, sum(_anon_kb(p) for p in _tree(self.pid)))
            self.done.wait(0.05)

    def stop(self):
        self.done.set()
        self.join()
        return round(self.peak_kb / 1024, 1)


def run(script, data_flag, data, out, cache, extra, evaluate_only=False):
    steps = ["--epochs", "0"] if evaluate_only else ["--max-train-steps", "20", "--epochs", "1"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml"),
           os.path.join(REPO, f"train_{script}.py"), data_flag, data, "--model",
           "timm:test_resnet", "--no-pretrained", *steps,
           "--output-dir", out, "--overwrite-output-dir", "--report-to", "none",
           "--checkpointing-steps", "no", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               XDG_CACHE_HOME=cache, HF_HOME=os.path.join(cache, "hf"))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    sampler = AnonPeak(proc.pid)
    sampler.start()
    _, stderr = proc.communicate()
    anon = sampler.stop()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    trained = [r for r in rows if r.get("train_seconds")]
    ips = trained[-1]["train_samples"] / trained[-1]["train_seconds"] if trained else None
    return dict(first_step_seconds=res.get("first_step_seconds"),
                process_seconds=round(wall, 1), peak_rss_mb=res["peak_rss_mb"],
                peak_anon_tree_mb=anon,
                train_images_per_second=round(ips, 1) if ips else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--kinds", default="folder,parquet")
    parser.add_argument("--scripts", default="finetune,extractor")
    parser.add_argument("--work", default="/tmp/tl-scale", help="generated data and caches")
    parser.add_argument("--json", default="scale.json")
    parser.add_argument("--warm-only", action="store_true",
                        help="only the second run, on the caches an earlier run of this script "
                             "left in --work (to re-measure the warm start after a change)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="--epochs 0: load, check and evaluate, no training step")
    parser.add_argument("--side", type=int, default=48,
                        help="image height in pixels (48: ~2-3 KB JPEGs, 96: ~9 KB)")
    parser.add_argument("--val-images", type=int, default=None,
                        help="a fixed number of val images, the rest train (default: a tenth)")
    args = parser.parse_args()
    global SIDE, VAL
    SIDE, VAL = args.side, args.val_images
    tag = f"{SIDE}" + (f"-v{VAL}" if VAL is not None else "")
    print(f"machine: {describe()}", flush=True)
    rows = []
    for n in map(int, args.sizes.split(",")):
        for kind in args.kinds.split(","):
            t0 = time.time()
            if kind == "folder":
                data, flag = make_folder(os.path.join(args.work, f"folder-{n}-{tag}"), n), \
                    "--data-dir"
            else:
                data, flag = make_parquet(os.path.join(args.work, f"parquet-{n}-{tag}"), n), \
                    "--dataset"
            print(f"{kind} of {n} images ready ({time.time() - t0:.0f} s)", flush=True)
            for script in args.scripts.split(","):
                cache = os.path.join(args.work, f"cache-{kind}-{n}-{script}")
                if args.warm_only and not os.path.isdir(cache):
                    raise SystemExit(f"--warm-only: no {cache}; run without it first")
                if not args.warm_only:
                    shutil.rmtree(cache, ignore_errors=True)  # the first run: everything cold
                extra = ["--probe-epochs", "0"] if script == "finetune" else []
                for attempt in ("second",) if args.warm_only else ("first", "second"):
                    r = run(script, flag, data, os.path.join(args.work, "run"), cache, extra,
                            args.evaluate_only)
                    r.update(images=n, kind=kind, script=script, run=attempt, side=SIDE,
                             evaluate_only=args.evaluate_only)
                    rows.append(r)
                    fmt = lambda v, unit: "-" if v is None else f"{v:6.1f} {unit}"  # noqa
                    print(f"{n:7d} {kind:8s} {script:10s} {attempt:6s}: first step "
                          f"{fmt(r['first_step_seconds'], 's')}, process "
                          f"{r['process_seconds']:6.1f} s, peak RSS {r['peak_rss_mb']:6.0f} MB, "
                          f"peak anon (tree) {r['peak_anon_tree_mb']:6.0f} MB, train "
                          f"{fmt(r['train_images_per_second'], 'img/s')}", flush=True)
                    with open(args.json, "w") as fh:
                        json.dump(dict(machine=describe(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
