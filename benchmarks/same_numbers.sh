#!/usr/bin/env bash
# Short real runs whose every metrics row must stay the same under a change that should not
# move numbers (a refactor): run it before and after, then compare the two folders:
#   bash benchmarks/same_numbers.sh /tmp/before     # on the old commit (a separate worktree)
#   bash benchmarks/same_numbers.sh /tmp/after      # on the new one
#   python benchmarks/same_numbers.py /tmp/before /tmp/after
# About 8 minutes on 2 CPU cores. Needs ../shared (or TL_SHARED_DIR): the data and weights.
set -e
out=$1
shared=${TL_SHARED_DIR:-$(dirname "$0")/../../shared}
S=$shared/data W=$shared/weights/tf_efficientnet_lite0.in1k.safetensors
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
cd "$(dirname "$0")/.."
rm -rf "$out"; mkdir -p "$out"
run() { name=$1; cfg=$2; script=$3; shift 3
  t0=$(date +%s)
  accelerate launch --config_file accelerate_configs/$cfg.yaml train_$script.py --seed 0 \
    --report-to none --weights "$W" --output-dir "$out/$name" \
    --feature-cache-dir "$out/cache-$name" "$@" > "$out/$name.log" 2>&1 \
    || { echo "FAIL $name"; tail -5 "$out/$name.log"; }
  echo "$name $(( $(date +%s) - t0 )) s"; rm -rf "$out/cache-$name"; }
run ft-hotdog cpu finetune --data-dir $S/hotdog --max-train-steps 24
run ext-brain cpu extractor --data-dir $S/brain_mri
run ft-phase cpu finetune --data-dir $S/rice_leaf --freeze-epochs 1 --model-ema --lr auto \
  --find-lr-steps 20 --max-train-steps 14
run ext-2p cpu_2proc extractor --data-dir $S/hotdog --epochs 4 --mixup 0.2
run ft-2p cpu_2proc finetune --data-dir $S/hotdog --max-train-steps 6 --probe-epochs 3
