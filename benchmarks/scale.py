"""Start-up and memory as the data grows: 1k, 10k, 100k small JPEGs, as an image folder and
as a parquet dataset with the image bytes embedded (as Hub datasets store them).

    python benchmarks/scale.py                         # both scripts, 1k/10k/100k, ~40 min here
    python benchmarks/scale.py --sizes 2000,20000 --kinds parquet --scripts finetune
    python benchmarks/scale.py --sizes 10000,100000 --warm-only   # second runs again

For each size, kind and script: two runs of the same command (the first with every cache
cold, the second reusing the image-check verdicts, the datasets cache and the features),
each `accelerate launch ... --max-train-steps 20` so that it measures start-up, not the
whole epoch. Reported per run: seconds from the script's first line to its first optimiser
step (results.json `first_step_seconds`), the process wall time, peak RSS of the training
process (`peak_rss_mb`), and the training loop's images/s. The model is timm's tiny
`test_resnet` (random weights): what grows with the data is the start-up, not the model.
Targets: from 10k to 100k images, peak RSS grows by at most 150 MB, and the second run
reaches its first step within 10 s more.
"""

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from machine import describe  # noqa: E402

CLASSES = ("a", "b", "c", "d")


def jpeg(i):
    """A small photo-like JPEG (~2-3 KB): a colour per class, noise per image."""
    rng = np.random.default_rng(i)
    base = np.array([(200, 60, 60), (60, 200, 60), (60, 60, 200), (200, 200, 60)][i % 4])
    arr = np.clip(base + rng.normal(0, 30, (48, 64, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_folder(root, n):
    if os.path.isdir(root):
        return root
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        split = "val" if (i // 4) % 10 == 0 else "train"  # every class has val images
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
        idx = [i for i in range(n) if ((i // 4) % 10 == 0) == (split == "val")]
        for part, start in enumerate(range(0, len(idx), 20000)):  # files of 20k rows
            chunk = idx[start:start + 20000]
            ds = datasets.Dataset.from_dict(
                {"image": [{"bytes": jpeg(i), "path": None} for i in chunk],
                 "label": [CLASSES[i % 4] for i in chunk]}, features=features)
            ds.to_parquet(os.path.join(tmp, f"{name}-{part:05d}.parquet"))
    os.replace(tmp, root)
    return root


def run(script, data_flag, data, out, cache, extra):
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
           "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml"),
           os.path.join(REPO, f"train_{script}.py"), data_flag, data, "--model",
           "timm:test_resnet", "--no-pretrained", "--max-train-steps", "20", "--epochs", "1",
           "--output-dir", out, "--overwrite-output-dir", "--report-to", "none",
           "--checkpointing-steps", "no", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               XDG_CACHE_HOME=cache, HF_HOME=os.path.join(cache, "hf"))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    ips = rows[-1]["train_samples"] / rows[-1]["train_seconds"]
    return dict(first_step_seconds=res["first_step_seconds"], process_seconds=round(wall, 1),
                peak_rss_mb=res["peak_rss_mb"], train_images_per_second=round(ips, 1))


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
    args = parser.parse_args()
    print(f"machine: {describe()}", flush=True)
    rows = []
    for n in map(int, args.sizes.split(",")):
        for kind in args.kinds.split(","):
            t0 = time.time()
            if kind == "folder":
                data, flag = make_folder(os.path.join(args.work, f"folder-{n}"), n), "--data-dir"
            else:
                data, flag = make_parquet(os.path.join(args.work, f"parquet-{n}"), n), "--dataset"
            print(f"{kind} of {n} images ready ({time.time() - t0:.0f} s)", flush=True)
            for script in args.scripts.split(","):
                cache = os.path.join(args.work, f"cache-{kind}-{n}-{script}")
                if args.warm_only and not os.path.isdir(cache):
                    raise SystemExit(f"--warm-only: no {cache}; run without it first")
                if not args.warm_only:
                    shutil.rmtree(cache, ignore_errors=True)  # the first run: everything cold
                extra = ["--probe-epochs", "0"] if script == "finetune" else []
                for attempt in ("second",) if args.warm_only else ("first", "second"):
                    r = run(script, flag, data, os.path.join(args.work, "run"), cache, extra)
                    r.update(images=n, kind=kind, script=script, run=attempt)
                    rows.append(r)
                    print(f"{n:7d} {kind:8s} {script:10s} {attempt:6s}: first step "
                          f"{r['first_step_seconds']:6.1f} s, process {r['process_seconds']:6.1f}"
                          f" s, peak RSS {r['peak_rss_mb']:6.0f} MB, train "
                          f"{r['train_images_per_second']:6.1f} img/s", flush=True)
                    with open(args.json, "w") as fh:
                        json.dump(dict(machine=describe(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
