#!/usr/bin/env bash
# The E5 analogue (label noise) on Fashion-MNIST, run as resumable grids: rerun any stage and it
# continues where it stopped (finished cells are kept).  Stages:
#   pilot  - one seed at 60 % noise: SAM's rho and DAS's alpha chosen on the *validation* split over
#            named grids: rho in {0.2, 1, 4} x the paper's 0.05, alpha in {0.1, 1, 10} x the paper's 0.1;
#   pilot-wide - one more value past each grid edge: rho in {8, 16} x 0.05, alpha in {0.01, 0.03} x 0.1;
#   authors - DAS in the authors' variant at their alpha (ALPHA_AUTHORS, default 0.1), a column apart;
#   main   - METHODS (default sgd,sam,das,rebalance,sam-every-2,sam-every-5) x SEEDS (default 1,2,3) at noise
#            $NOISE with the chosen RHO and ALPHA, into $OUT/noise-$NOISE[-$TAG] (run seeds side by
#            side in separate dirs with SEEDS=... TAG=...; `tensorsam report` pools the dirs).
# Protocol: TR-ResNet-20 at rank 10; a seeded, stratified 2000-image training subset; 1000 validation
# images from the training split (noisy, like the training labels); the fixed 2000-image test subset
# at every evaluation (every 2 epochs) and the full 10k test set at the end; 30 epochs of SGD (momentum 0.9, wd 5e-4, lr 0.05,
# cosine, batch 128) without augmentation, so that SGD memorises the wrong labels.
set -euo pipefail
stage=${1:?usage: experiments/vision_e5.sh pilot|pilot-rho|pilot-alpha|pilot-wide|authors|main}
OUT=${OUT:-runs/e5}
NOISE=${NOISE:-0.6}
RHO=${RHO:-0.05}
ALPHA=${ALPHA:-0.1}
common=(vision --data fashion-mnist --depth 20 --format tr --rank 10 --epochs 30 --train-subset 2000
        --set val_size=1000 --set eval_every=30 --set augment=false --set threads=${THREADS:-2} --resume)
case "$stage" in
  pilot) "$0" pilot-rho && "$0" pilot-alpha ;;
  pilot-rho)      # SAM's rho, and the SGD reference
    for rho in 0.01 0.05 0.2; do
      tensorsam "${common[@]}" --methods sam --seeds 1 --label-noise 0.6 --set rho=$rho --out "$OUT/pilot/rho-$rho"
    done
    tensorsam "${common[@]}" --methods sgd --seeds 1 --label-noise 0.6 --out "$OUT/pilot/sgd" ;;
  pilot-alpha)    # DAS's alpha (can run beside pilot-rho: other output dirs)
    for alpha in 0.01 0.1 1; do
      tensorsam "${common[@]}" --methods das --seeds 1 --label-noise 0.6 --set alpha=$alpha --out "$OUT/pilot/alpha-$alpha"
    done ;;
  pilot-wide)     # one step past each edge of the grids above (0.2 and 0.01 were chosen at their edges)
    for rho in 0.4 0.8; do
      tensorsam "${common[@]}" --methods sam --seeds 1 --label-noise 0.6 --set rho=$rho --out "$OUT/pilot/rho-$rho"
    done
    for alpha in 0.001 0.003; do
      tensorsam "${common[@]}" --methods das --seeds 1 --label-noise 0.6 --set alpha=$alpha --out "$OUT/pilot/alpha-$alpha"
    done ;;
  authors)        # the authors' DAS (per-group u, divided by the gradient norm) at their alpha (0.1)
    tensorsam "${common[@]}" --methods das --seeds "${SEEDS:-1,2,3}" --label-noise "$NOISE" \
      --set das_variant=authors --set alpha=${ALPHA_AUTHORS:-0.1} --out "$OUT/authors-noise-$NOISE${TAG:+-$TAG}" ;;
  main)
    tensorsam "${common[@]}" --methods "${METHODS:-sgd,sam,das,rebalance,sam-every-2,sam-every-5}" --seeds "${SEEDS:-1,2,3}" \
      --label-noise "$NOISE" --set rho=$RHO --set alpha=$ALPHA --out "$OUT/noise-$NOISE${TAG:+-$TAG}" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
