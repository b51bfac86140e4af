"""Compare two folders of benchmarks/same_numbers.sh: every metrics.jsonl row and every
results.json value, timings and paths (feature cache, run folder) left out. Exit 1 on a difference.

    python benchmarks/same_numbers.py /tmp/before /tmp/after
"""

import json
import os
import sys

TIMINGS = ("seconds", "img_s", "rss", "wall", "time", "images_per_s", "per_second", "_s")


def _comparable(d):
    if isinstance(d, dict):
        return {k: _comparable(v) for k, v in d.items()
                if not any(t in k for t in TIMINGS) and k not in ("feature_cache", "output_dir")}
    if isinstance(d, list):
        return [_comparable(v) for v in d]
    return d


def main():
    before, after = sys.argv[1:3]
    differ = 0
    for run in sorted(os.listdir(before)):
        if not os.path.isdir(os.path.join(before, run)) or run.startswith("cache"):
            continue
        rows = [[_comparable(json.loads(line)) for line in open(os.path.join(d, run,
                                                                           "metrics.jsonl"))]
                for d in (before, after)]
        res = [_comparable(json.load(open(os.path.join(d, run, "results.json"))))
               for d in (before, after)]
        same = rows[0] == rows[1] and res[0] == res[1]
        differ += not same
        print(f"{run}: {'same' if same else 'DIFFERENT'} ({len(rows[0])} rows; best val acc "
              f"{res[0].get('best_val_accuracy')} / {res[1].get('best_val_accuracy')})")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
