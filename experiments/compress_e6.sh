#!/usr/bin/env bash
# The E6 analogue (compress a trained network, then fine-tune it) on Fashion-MNIST, as resumable
# grids: rerun any stage and it continues where it stopped (finished cells are kept).  Stages:
#   dense    - a dense ResNet-20 trained with SGD on a seeded, stratified 10k-image subset of the
#              training split (15 epochs, augmentation, the vision defaults), into $OUT/dense;
#   finetune - that model compressed with TT-SVD to $RATIO x fewer parameters (whole network, fc
#              kept dense), with and without balanced cores, then fine-tuned with sgd, sam, das and
#              sam-every-2 for 1 epoch on a 10k subset (seeded by the run's seed; 1000 validation images), SEEDS (default
#              1,2,3), into $OUT/ratio-$RATIO.  Run two ratios side by side in separate shells.
set -euo pipefail
stage=${1:?usage: experiments/compress_e6.sh dense|finetune}
OUT=${OUT:-runs/e6}
RATIO=${RATIO:-2.5}
case "$stage" in
  dense)
    tensorsam vision --data fashion-mnist --depth 20 --format none --methods sgd --seeds 1 --epochs 15 \
      --train-subset 10000 --set threads=${THREADS:-2} --out "$OUT/dense" --resume ;;
  finetune)
    tensorsam compress --model "$OUT/dense/models/$(ls "$OUT/dense/models" | head -n 1)" --format tt \
      --ratio "$RATIO" --balance false,true --methods sgd,sam,das,sam-every-2 --seeds "${SEEDS:-1,2,3}" \
      --epochs 1 --train-subset 10000 --set val_size=1000 --set threads=${THREADS:-1} --out "$OUT/ratio-$RATIO" --resume ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
