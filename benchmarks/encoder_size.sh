#!/usr/bin/env bash
# Encoder size by few-shot Dice at an equal pretraining budget (the shipped-models issue).
#
# Pretrains each size with `ar3d pretrain` on the shipped encoder's data (phantoms and the manifest's
# `pretrain` cases) for about the same compute (steps in inverse proportion to the measured time per
# step), then fine-tunes each on BraTS whole tumour, leave-one-out (`benchmarks/fewshot.py`, head
# mode, the defaults). On the 2-core CPU the defaults take about 15 minutes of pretraining per size.
#
#   bash benchmarks/encoder_size.sh [DATA] [OUT]        # defaults: ../shared/data runs/size
#   SIZES="tiny:3000 small:1700" SEED=0 bash benchmarks/encoder_size.sh
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/size}
SIZES=${SIZES:-"tiny:3000 small:1700"}
SEED=${SEED:-0}
mkdir -p "$OUT"
for entry in $SIZES; do
  size=${entry%%:*}
  steps=${entry##*:}
  if [ ! -f "$OUT/$size/model.safetensors" ]; then
    /usr/bin/time -f "$size pretrain wall %e s, max RSS %M KB" \
      ar3d pretrain --data phantoms "$DATA/manifest.json" --config "$size" --crop 64 --slab 32 --batch-size 2 \
        --steps "$steps" --warmup $((steps / 20)) --lr 3e-4 --ckpt-every 500 --log-every 50 --workers 1 \
        --seed "$SEED" --cache-dir "$OUT/cache" --out "$OUT/$size"
  fi
  python benchmarks/fewshot.py --data "$DATA" --ar "$OUT/$size" --inits ar --tasks brats_whole_tumor \
    --seed "$SEED" --out "$OUT/fewshot_$size.json" --markdown "$OUT/fewshot_$size.md"
done
