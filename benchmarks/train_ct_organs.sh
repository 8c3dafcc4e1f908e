#!/usr/bin/env bash
# Rebuild the shipped segmenter `ar3d-ct-organs` end to end: data, fine-tuning, held-out evaluation, packaging.
#
#   bash benchmarks/train_ct_organs.sh [DATA] [WORK]
#
# DATA: the shared data folder (default $AR3D_DATA, else ../shared/data); WORK: a scratch folder outside
# the repository (default ../runs). Needs the `ar3d` command on PATH (the package installed).
# Steps (see benchmarks/train_ct_organs.py for the data and why each case is in or out):
#   1. prepare: relabel the cases to six classes, write 6 CT phantoms for training and one for evaluation;
#   2. finetune: head mode from ar3d-encoder (the real case twice, to weigh it against six phantoms);
#   3. segment + evaluate every held-out case (a real CT of a patient not trained on, and a fresh phantom);
#   4. ship: float16 weights and the held-out scores into model_core/shipped/ar3d-ct-organs.
# Set SHIP=0 to stop after step 3. MODE=full trains the full model instead (slower; see the model card).
set -euo pipefail

DATA=${1:-${AR3D_DATA:-../shared/data}}
WORK=${2:-../runs}
MODE=${MODE:-head}
STEPS=${STEPS:-1500}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PREP=$WORK/ct_organs_data
RUN=$WORK/ct_organs_$MODE
EVAL=$WORK/ct_organs_${MODE}_eval

python "$REPO/benchmarks/train_ct_organs.py" prepare --data "$DATA" --out "$PREP"

TRAIN=()
for case in phantom_100 phantom_101 phantom_102 phantom_103 phantom_104 phantom_105 \
            totalseg_ct_dicom totalseg_ct_dicom; do
  TRAIN+=(--train "$PREP/train/$case/image.nii.gz" "$PREP/train/$case/seg.nii.gz")
done
rm -rf "$RUN"
start=$(date +%s)
ar3d finetune --model ar3d-encoder "${TRAIN[@]}" --out "$RUN" --mode "$MODE" --steps "$STEPS" \
  --crops 24 --seed 0
echo "finetune wall time: $(( $(date +%s) - start )) s"

rm -rf "$EVAL" && mkdir -p "$EVAL"
for case in totalseg_ct_sm totalseg_ct_full phantom_1000; do
  scored=()  # ct_full is labelled for vertebrae only: score that class alone
  [ "$case" = totalseg_ct_full ] && scored=(--labels 6)
  ar3d segment --model "$RUN" "$PREP/heldout/$case/image.nii.gz" -o "$EVAL/${case}_pred.nii.gz"
  ar3d evaluate --pred "$EVAL/${case}_pred.nii.gz" --truth "$PREP/heldout/$case/seg.nii.gz" "${scored[@]}" \
    --json > "$EVAL/$case.json"
  python -c "import json, sys; d = json.load(open(sys.argv[1])); \
print(sys.argv[2], ', '.join(f\"{c['name']} {c['dice']}\" for c in d['classes']), '| mean', d['mean_dice'])" \
    "$EVAL/$case.json" "$case"
done

if [ "${SHIP:-1}" = 1 ]; then
  python "$REPO/benchmarks/train_ct_organs.py" ship --run "$RUN" --eval "$EVAL" --prep "$PREP" \
    --out "$REPO/model_core/shipped/ar3d-ct-organs" \
    --command "MODE=$MODE STEPS=$STEPS bash benchmarks/train_ct_organs.sh $DATA $WORK"
  python "$REPO/benchmarks/train_ct_organs.py" plot --model "$REPO/model_core/shipped/ar3d-ct-organs" \
    --out "$REPO/docs/images/ct_organs_training.png"
fi
