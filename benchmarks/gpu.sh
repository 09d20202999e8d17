#!/usr/bin/env bash
# One GPU session of at most BUDGET (default 360) seconds, offline: the vision speed benchmark on CUDA,
# then the largest E5 cell (TR-ResNet-32 rank 15, Fashion-MNIST, label noise 0.6; sgd, sam, das; seed 1)
# whose epochs fit in the time left, estimated from the benchmark's own step times.
#
#   OUT=/path/to/out bash benchmarks/gpu.sh       # results land in $OUT as they are made (default ./gpu-out)
#
# Needs, besides the working tree (run it from the repository root; it uses src/ through PYTHONPATH,
# no install):
#   - Python with torch (CUDA), numpy, scipy, opt_einsum, rich, pyyaml, matplotlib;
#   - tensorly, which the H200 image lacks: carry `.whl` holding its wheel, made here with
#       python3 -m pip download --no-deps --only-binary=:all: tensorly==0.10.0 -d .whl
#     (installed into /tmp/site when `import tensorly` fails);
#   - the Fashion-MNIST IDX files: copy /usr/share/datasets/fashion-mnist to shared/fashion-mnist and carry
#     `shared/fashion-mnist` (its *.gz names are git-ignored), or set DATA_DIR; passed as --set data_dir=.
# So on the device tool: carry [".whl", "shared/fashion-mnist"], command `bash benchmarks/gpu.sh`.
#
# Settings (environment): OUT, BUDGET (s), DEVICE (cuda), DATA_DIR, PYTHON, BENCH_ARGS (extra flags of
# benchmarks/vision.py), TRAIN_SUBSET (E5 on fewer images, for a dry run), E5_DEFAULT_EPOCHS (when no
# estimate can be made).  A CPU dry run of the script's logic:
#   DEVICE=cpu BUDGET=150 BENCH_ARGS="--quick --threads 1" TRAIN_SUBSET=256 OUT=/tmp/gpu-dry bash benchmarks/gpu.sh
# $OUT gets gpu.log (everything printed), vision.json, e5-gpu/{results.json, vision_curves.png, models/*.pt}:
# 7 files, within the 8 that the device tool brings back.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
OUT=${OUT:-./gpu-out}
BUDGET=${BUDGET:-360}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TRAIN_SUBSET=${TRAIN_SUBSET:-0}
mkdir -p "$OUT"
log() { echo "[gpu.sh $((SECONDS - start)) s] $*" | tee -a "$OUT/gpu.log"; }
left() { echo $((BUDGET - (SECONDS - start))); }

if [ -z "${DATA_DIR:-}" ]; then
    DATA_DIR=/usr/share/datasets/fashion-mnist
    [ -d shared/fashion-mnist ] && DATA_DIR=$PWD/shared/fashion-mnist
fi
if ! "$PYTHON" -c "import tensorly" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        log "tensorly is missing and no .whl/ was carried (see the top of this script)"; exit 2
    fi
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PYTHON" -c "import tensorsam, torch; print('tensorsam', tensorsam.__version__, 'torch', torch.__version__, \
'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/gpu.log" || exit 2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/gpu.log"
log "data: $DATA_DIR; budget ${BUDGET} s"

# 1. the speed benchmark (dense and TR ResNet-20 and -32; -32 feeds the E5 estimate): repeats stop
# after 100 s (at least 3), the timeout is the backstop
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
timeout -k 10 160 "$PYTHON" benchmarks/vision.py --device "$DEVICE" --depth 20,32 --formats none,tr --rank 10 \
    --repeats 15 --steps 10 --threads 4 --max-seconds 100 --out "$OUT/vision.json" ${BENCH_ARGS:-} 2>&1 \
    | tee -a "$OUT/gpu.log"
log "benchmark exit status ${PIPESTATUS[0]}"

# 2. E5: epochs from the measured TR step times (ResNet-32 rows, else ResNet-20 x 1.6), rank 15 at +15 %
# and a 20 % margin; fixed costs (start-up, data, final evaluations, 3 cells) taken as 45 s
remaining=$(( $(left) - 15 ))
epochs=$("$PYTHON" - "$OUT/vision.json" "$remaining" "$TRAIN_SUBSET" "${E5_DEFAULT_EPOCHS:-3}" <<'EOF'
import json, sys
path, remaining, subset, default = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = (subset or 54000) // 128                   # Fashion-MNIST: 60000 minus 6000 for validation
try:
    rows = json.load(open(path))["rows"]
except (OSError, ValueError, KeyError):
    print(default); sys.exit()
def step_s(depth, method):
    ms = [r["ms_per_step"] for r in rows if r["model"].startswith(f"TR-ResNet-{depth} ") and r["method"] == method]
    return ms[0] / 1e3 if ms else None
per_epoch = 0.0
for m in ("sgd", "sam", "das"):
    s = step_s(32, m) or (step_s(20, m) or 0.05) * 1.6
    per_epoch += steps * s * 1.15 * 1.2 + 2.0      # + an evaluation (10k images) per epoch
print(max(1, int((remaining - 45) / per_epoch)))
EOF
)
remaining=$(( $(left) - 10 ))
if ! compgen -G "$DATA_DIR/train-images-idx3-ubyte*" >/dev/null; then
    log "no Fashion-MNIST IDX files in $DATA_DIR: E5 skipped (carry shared/fashion-mnist or set DATA_DIR)"; exit 3
fi
log "E5 cell: $epochs epochs, timeout ${remaining} s"
subset=()
[ "$TRAIN_SUBSET" != 0 ] && subset=(--train-subset "$TRAIN_SUBSET" --set test_subset=256 --set val_size=256)
timeout -k 10 "$remaining" "$PYTHON" -m tensorsam vision --data fashion-mnist --depth 32 --format tr --rank 15 \
    --methods sgd,sam,das --seeds 1 --label-noise 0.6 --epochs "$epochs" --device "$DEVICE" \
    --out "$OUT/e5-gpu" --resume --set "data_dir=$DATA_DIR" "${subset[@]}" 2>&1 | tee -a "$OUT/gpu.log"
log "E5 exit status ${PIPESTATUS[0]} (124: stopped by the timeout; finished cells are in $OUT/e5-gpu/results.json)"
# the device tool returns 8 files from $OUT: move the checkpoints and finished-cell payloads aside
if [ -d "$OUT/e5-gpu/.work" ] && [ -z "${KEEP_WORK:-}" ]; then
    rm -rf /tmp/e5-gpu-work && mv "$OUT/e5-gpu/.work" /tmp/e5-gpu-work && log "moved $OUT/e5-gpu/.work to /tmp/e5-gpu-work"
fi
log "done in $((SECONDS - start)) s"
