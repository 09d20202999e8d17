#!/usr/bin/env bash
# The E4 analogue (clean data, accuracy against rank) on Fashion-MNIST, run as resumable grids:
# rerun any stage and it continues where it stopped (finished cells are kept).  Stages:
#   pilot-rho   - TR rank 7, seed 1: SAM's rho in RHOS (default {0.01, 0.05, 0.2}), and the SGD reference;
#   pilot-alpha - TR rank 7, seed 1: DAS's alpha in ALPHAS (default {0.01, 0.1, 1}; the pilot chose the
#                 edge 1, so ALPHAS="3 10" widened it) (Eq. 9, global u_D); both chosen
#                 by the best accuracy on the validation split (never the test set);
#   main        - FORMAT (cp or tr) at its three ranks (CP {10, 20, 50}, TR {5, 7, 12}: the low end of
#                 the paper's sets, which fits the budget) x {sgd, sam, das} x SEEDS (default 1,2,3)
#                 with the chosen RHO and ALPHA, into $OUT/$FORMAT${TAG:+-$TAG};
#                 `tensorsam report` pools the dirs and draws the Fig. 3 analogue (gain over SGD
#                 against the compression ratio).
# Protocol: ResNet-20; a seeded, stratified SUBSET-image training subset (default 3000; the issue's
# 5000 costs 1.7x, about 7 core-minutes per SGD cell here) and 1000 validation images, both from the
# training split; clean labels; EPOCHS (default 10) of SGD (momentum 0.9, wd 5e-4, lr 0.05, cosine,
# batch 128) with random crop and flip; evaluation every EVAL_EVERY steps (default 46, about two
# epochs) on the validation split and a fixed 2000-image test subset, the full 10k test set for the
# final and best-val states.
set -euo pipefail
stage=${1:?usage: experiments/vision_e4.sh pilot-rho|pilot-alpha|main}
OUT=${OUT:-runs/e4}
FORMAT=${FORMAT:-tr}
RHO=${RHO:-0.05}
ALPHA=${ALPHA:-0.1}
common=(vision --data fashion-mnist --depth 20 --epochs "${EPOCHS:-10}" --train-subset "${SUBSET:-3000}"
        --set val_size=1000 --set eval_every="${EVAL_EVERY:-46}" --set threads="${THREADS:-2}" --resume)
case "$FORMAT" in
  cp) ranks=${RANKS:-10,20,50} ;;
  tr) ranks=${RANKS:-5,7,12} ;;
  *) echo "FORMAT must be cp or tr, not $FORMAT" >&2; exit 2 ;;
esac
case "$stage" in
  pilot-rho)
    for rho in ${RHOS:-0.01 0.05 0.2}; do
      tensorsam "${common[@]}" --format tr --rank 7 --methods sam --seeds 1 --set rho=$rho --out "$OUT/pilot/rho-$rho"
    done
    tensorsam "${common[@]}" --format tr --rank 7 --methods sgd --seeds 1 --out "$OUT/pilot/sgd" ;;
  pilot-alpha)
    for alpha in ${ALPHAS:-0.01 0.1 1}; do
      tensorsam "${common[@]}" --format tr --rank 7 --methods das --seeds 1 --set alpha=$alpha --out "$OUT/pilot/alpha-$alpha"
    done ;;
  main)
    tensorsam "${common[@]}" --format "$FORMAT" --rank "$ranks" --methods "${METHODS:-sgd,sam,das}" \
      --seeds "${SEEDS:-1,2,3}" --set rho=$RHO --set alpha=$ALPHA --out "$OUT/$FORMAT${TAG:+-$TAG}" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
