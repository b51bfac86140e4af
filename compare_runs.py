"""Compare finished runs: a table in the terminal and a PNG of val accuracy/loss per epoch.

    python compare_runs.py outputs/finetune-* outputs/extractor-* --output compare.png

Reads each run folder's results.json and metrics.jsonl (no network, no W&B account). A W&B
offline run folder (`<run>/wandb/offline-run-*`) is accepted too and read with wandb's own
reader (`wandb leet inspect`): its summary fills the table (it holds no per-epoch curve).
"""

import argparse
import glob
import json
import os
import subprocess
import sys

from common.errors import UserError, cli

COLUMNS = [("run", "run"), ("script", "script"), ("model", "model"), ("epochs", "epochs"),
           ("best val acc", "best_val_accuracy"), ("best epoch", "best_epoch"),
           ("wall s", "wall_seconds"), ("procs", "num_processes"),
           ("precision", "mixed_precision")]


def _wandb_run(path):
    """(results-like dict, []) from a W&B offline run folder, via wandb's reader."""
    exe = os.path.join(os.path.dirname(sys.executable), "wandb")
    proc = subprocess.run([exe if os.path.exists(exe) else "wandb", "leet", "inspect",
                           "--summary", "--json", path], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise UserError(f"{path}: wandb could not read this run ({proc.stderr.strip()[:200]})")
    info = json.loads(proc.stdout)
    cfg, summ = info.get("config", {}), info.get("summary", {})
    res = dict(script=cfg.get("script"), model=cfg.get("model"), epochs=cfg.get("epochs"),
               num_processes=cfg.get("num_processes"), mixed_precision=cfg.get("mixed_precision"),
               best_val_accuracy=summ.get("best_val_accuracy"), best_epoch=summ.get("best_epoch"),
               wall_seconds=round(summ.get("_runtime", 0), 1))
    return res, []


def load_run(path):
    """(results, metrics rows) of a run folder or a W&B offline run folder."""
    if glob.glob(os.path.join(path, "run-*.wandb")):
        return _wandb_run(path)
    try:
        with open(os.path.join(path, "results.json")) as fh:
            results = json.load(fh)
    except OSError:
        raise UserError(f"{path}: no results.json (not a finished run folder)") from None
    rows = []
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        with open(os.path.join(path, "metrics.jsonl")) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    return results, rows


def table(runs):
    cells = [[h for h, _ in COLUMNS]]
    for name, res, _ in runs:
        row = []
        for header, key in COLUMNS:
            v = name if key == "run" else res.get(key)
            row.append(f"{v:.4f}" if isinstance(v, float) and key == "best_val_accuracy"
                       else "-" if v is None else str(v))
        cells.append(row)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (or W&B offline run folders)")
    parser.add_argument("--output", default="compare_runs.png", help="curves PNG")
    args = parser.parse_args(argv)
    runs = []
    for path in args.runs:
        res, rows = load_run(path)
        runs.append((os.path.basename(os.path.normpath(path)), res, rows))
    print(table(runs))
    curves = [(f"{name} ({res.get('script')}, {res.get('model')})",
               [r["epoch"] for r in rows], [r["val_accuracy"] for r in rows],
               [r["val_loss"] for r in rows]) for name, res, rows in runs if rows]
    if curves:
        from common.viz import curves_png

        curves_png(curves, args.output)
        print(f"curves -> {args.output}")
    return runs


if __name__ == "__main__":
    main()
