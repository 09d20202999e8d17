#!/usr/bin/env bash
# One GPU session of at most BUDGET (default 360) seconds, offline, writing results into $OUT as it
# goes.  Steps, in order, each skipped when too little time is left and stopped by a timeout:
#   env       the environment (torch, CUDA, GPU, packages): env.json (sync_check.py --env)
#   sync      no host sync in any optimizer step, every factory method: sync.json (benchmarks/sync_check.py)
#   layers    the layer benchmark on the GPU (benchmarks/layers.py --quick): layers.md
#   vision    SGD, SAM, DAS, rebalance step times on TR-ResNet-32 (benchmarks/vision.py): vision.json
#   finetune  Adam, SAM, DAS, rebalance on a BERT of MiniLM's sizes (random weights) with FLoRA
#             (benchmarks/finetune.py --model minilm-config): finetune.json
#   compile   DAS eager vs DAS with compile=True, paired with SGD: compile.json (the error, if compile fails)
#   e5        the largest E5 cell (TR-ResNet-32 rank 15, Fashion-MNIST, label noise 0.6; sgd, sam, das;
#             seed 1) whose epochs fit in the time left, estimated from vision.json: e5-gpu/results.json
#
#   OUT=/path/to/out bash benchmarks/gpu.sh       # default ./gpu-out
#
# Needs, besides the working tree (run it from the repository root; it uses src/ through PYTHONPATH,
# no install):
#   - Python with torch (CUDA), numpy, scipy, opt_einsum, rich, pyyaml, matplotlib; transformers, peft
#     and accelerate for the finetune step (the H100/H200 image has them);
#   - tensorly, which the H200 image lacks: carry `.whl` holding its wheel (7.1 MiB), made here with
#       python3 -m pip download --no-deps --only-binary=:all: tensorly==0.10.0 -d .whl
#     (installed into /tmp/site when `import tensorly` fails);
#   - for E5 only, the Fashion-MNIST IDX files (29.5 MiB): copy /usr/share/datasets/fashion-mnist to
#     shared/fashion-mnist and carry `shared/fashion-mnist` (its *.gz names are git-ignored), or set DATA_DIR.
# So on the device tool: carry [".whl", "shared/fashion-mnist"], command `bash benchmarks/gpu.sh`.  The
# payload is the tracked tree (about 18 MiB) + the wheel + the data, about 55 MiB of the 64 MiB allowed
# (check with `du -sh .whl shared` and `git ls-files | xargs du -cb | tail -1`).
#
# Settings (environment): OUT, BUDGET (s), DEVICE (cuda), STEPS (comma-separated subset of the steps
# above, default all), QUICK (smoke sizes; default 1 on the CPU, 0 on CUDA), DATA_DIR, PYTHON,
# BENCH_ARGS (extra flags of the vision step), TRAIN_SUBSET (E5 on fewer images, for a dry run),
# E5_DEFAULT_EPOCHS (when no estimate can be made), KEEP_WORK (keep E5's checkpoints and figure in $OUT),
# CAP_SCALE (times each step's timeout cap; default 3 when QUICK).
# A CPU dry run of the script's logic (tests/test_gpu_script.py runs a shorter one):
#   DEVICE=cpu BUDGET=240 TRAIN_SUBSET=256 OUT=/tmp/gpu-dry bash benchmarks/gpu.sh
# $OUT gets gpu.log (everything printed, and one status line per step at the end), env.json, sync.json,
# layers.md, vision.json, finetune.json, compile.json, e5-gpu/results.json: the 8 files the device tool
# brings back (E5's checkpoints, figure and work files are moved to /tmp/e5-gpu-aside).
# Exit status: 0, or 1 when a step that ran failed (see the status lines).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
OUT=${OUT:-./gpu-out}
BUDGET=${BUDGET:-360}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TRAIN_SUBSET=${TRAIN_SUBSET:-0}
STEPS=${STEPS:-env,sync,layers,vision,finetune,compile,e5}
if [ "$DEVICE" = cpu ]; then QUICK=${QUICK:-1}; else QUICK=${QUICK:-0}; fi
# each step's timeout is its cap (sized for the GPU machine) times CAP_SCALE (default 3 in a dry run on
# a CPU, whose start-up alone can take a GPU step's time), at most the time left
[ "$QUICK" = 1 ] && CAP_SCALE=${CAP_SCALE:-3}
CAP_SCALE=${CAP_SCALE:-1}
RESERVE=10                      # seconds kept for the last lines and a step's kill grace
mkdir -p "$OUT"
log() { echo "[gpu.sh $((SECONDS - start)) s] $*" | tee -a "$OUT/gpu.log"; }
left() { echo $((BUDGET - (SECONDS - start))); }
statuses=()
failed=0

# step NAME MIN CAP CMD...: run CMD (output to the log and $OUT/.step.log) under a timeout of
# min(CAP x CAP_SCALE, time left - RESERVE); skipped when not in STEPS or when that is under MIN seconds
step() {
    local name=$1 min=$2 cap=$3 t rc
    shift 3
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    t=$(( $(left) - RESERVE ))
    (( t > cap * CAP_SCALE )) && t=$(( cap * CAP_SCALE ))
    if (( t < min )); then
        log "$name: skipped (${t} s left for it, needs ${min} s)"; statuses+=("$name: skipped"); return 0
    fi
    log "$name: start, timeout ${t} s"
    : >"$OUT/.step.log"
    timeout -k 5 "$t" "$@" 2>&1 | tee -a "$OUT/gpu.log" "$OUT/.step.log"
    rc=${PIPESTATUS[0]}
    log "$name: exit status $rc$([ "$rc" = 124 ] && echo ' (stopped by the timeout)')"
    statuses+=("$name: exit status $rc")
    [ "$rc" = 0 ] || failed=1
    return "$rc"
}

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
log "device $DEVICE, budget ${BUDGET} s, quick $QUICK, steps $STEPS, data $DATA_DIR"

# 1. the environment: the GPU machine may have another torch and no network
step env 5 30 "$PYTHON" benchmarks/sync_check.py --env "$OUT/env.json"

# 2. every method's optimizer step under set_sync_debug_mode("error") (a dry run on the CPU)
step sync 15 60 "$PYTHON" benchmarks/sync_check.py --device "$DEVICE" --out "$OUT/sync.json"

# 3. the layer benchmark on the device.  layers.py has no --device: this runs its main() with the GPU as
# torch's default device while layers and inputs are made, each timed call without that mode (a Python
# hook on every op), and its time.perf_counter synchronised, so that a timed span holds the GPU's work
read -r -d '' LAYERS_ON_DEVICE <<'EOF'
import importlib.util, sys, time, types
import torch
device = torch.device(sys.argv[1])
spec = importlib.util.spec_from_file_location("layers_bench", "benchmarks/layers.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
if device.type == "cuda":
    def synced():
        torch.cuda.synchronize(device)
        return time.perf_counter()
    mod.time = types.SimpleNamespace(**{**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")},
                                        "perf_counter": synced})
    def without_default_device(factory):
        def make(*args):
            run = factory(*args)
            def timed():
                torch.set_default_device(None)
                try:
                    return run()
                finally:
                    torch.set_default_device(device)
            return timed
        return make
    mod.fwd_bwd, mod.train_step = without_default_device(mod.fwd_bwd), without_default_device(mod.train_step)
    torch.set_default_device(device)
sys.exit(mod.main(sys.argv[2:]))
EOF
layer_args=(--quick --out "$OUT/layers.md" --threads 4)
[ "$QUICK" = 1 ] && layer_args=(--quick --skip-goals --out "$OUT/layers.md" --threads 1)
step layers 20 60 "$PYTHON" -c "$LAYERS_ON_DEVICE" "$DEVICE" "${layer_args[@]}"

# 4. step times: TR-ResNet-32 (rank 10; its rows also feed the E5 estimate), then MiniLM-sized BERT + FLoRA
vision_args=(--repeats 15 --steps 10 --threads 4 --max-seconds 35)
[ "$QUICK" = 1 ] && vision_args=(--quick --threads 1)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step vision 25 70 "$PYTHON" benchmarks/vision.py --device "$DEVICE" --depth 32 --formats tr --rank 10 \
    --methods sgd,sam,das,rebalance "${vision_args[@]}" --out "$OUT/vision.json" ${BENCH_ARGS:-}
finetune_args=(--model minilm-config --repeats 10 --steps 5 --threads 4 --max-seconds 35)
[ "$QUICK" = 1 ] && finetune_args=(--model tiny-bert --repeats 2 --steps 1 --warmup 1 --batch-size 4 --max-length 16)
step finetune 30 70 "$PYTHON" benchmarks/finetune.py --device "$DEVICE" --adapters flora \
    --methods adam,sam,das,rebalance "${finetune_args[@]}" --out "$OUT/finetune.json"

# 5. DAS's scaling compiled (compile=True: one torch.compile'd function) against eager, both paired with SGD
compile_args=(--repeats 10 --steps 10 --threads 4 --max-seconds 30)
[ "$QUICK" = 1 ] && compile_args=(--quick --threads 1)
if ! step compile 30 80 "$PYTHON" benchmarks/vision.py --device "$DEVICE" --depth 32 --formats tr --rank 10 \
        --methods sgd,das,das+compile "${compile_args[@]}" --out "$OUT/compile.json" \
        && [ ! -s "$OUT/compile.json" ]; then
    "$PYTHON" - "$OUT/.step.log" "$OUT/compile.json" "${statuses[-1]}" <<'EOF'
import json, os, sys
tail = open(sys.argv[1], errors="replace").read().splitlines()[-40:]
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump({"benchmark": "vision", "methods": ["sgd", "das", "das+compile"], "failed": sys.argv[3],
               "log_tail": tail}, f, indent=1)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
EOF
    log "compile: failed; the end of its output is in $OUT/compile.json"
fi

# 6. E5 with the time left: epochs from the measured TR-ResNet-32 step times (rank 15 at +15 %) and a
# 20 % margin; fixed costs (start-up, data, final evaluations, 3 cells) taken as 45 s
if [[ ",$STEPS," == *",e5,"* ]] && ! compgen -G "$DATA_DIR/train-images-idx3-ubyte*" >/dev/null; then
    log "e5: skipped: no Fashion-MNIST IDX files in $DATA_DIR (carry shared/fashion-mnist or set DATA_DIR)"
    statuses+=("e5: skipped (no data)")
    STEPS=${STEPS//e5/}
fi
epochs=$("$PYTHON" - "$OUT/vision.json" "$(( $(left) - 15 ))" "$TRAIN_SUBSET" "${E5_DEFAULT_EPOCHS:-3}" <<'EOF'
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
subset=()
[ "$TRAIN_SUBSET" != 0 ] && subset=(--train-subset "$TRAIN_SUBSET" --set test_subset=256 --set val_size=256)
step e5 40 100000 "$PYTHON" -m tensorsam vision --data fashion-mnist --depth 32 --format tr --rank 15 \
    --methods sgd,sam,das --seeds 1 --label-noise 0.6 --epochs "$epochs" --device "$DEVICE" \
    --out "$OUT/e5-gpu" --resume --set "data_dir=$DATA_DIR" "${subset[@]}"
# the device tool returns 8 files from $OUT: move the checkpoints, figure and work files aside
if [ -d "$OUT/e5-gpu" ] && [ -z "${KEEP_WORK:-}" ]; then
    rm -rf /tmp/e5-gpu-aside && mkdir -p /tmp/e5-gpu-aside
    for f in "$OUT"/e5-gpu/* "$OUT"/e5-gpu/.work; do
        [ -e "$f" ] && [ "$(basename "$f")" != results.json ] && mv "$f" /tmp/e5-gpu-aside/
    done
    log "e5: moved everything but results.json from $OUT/e5-gpu to /tmp/e5-gpu-aside"
fi

rm -f "$OUT/.step.log"
for s in "${statuses[@]}"; do log "status: $s"; done
log "done in $((SECONDS - start)) s of ${BUDGET} s"
exit "$failed"
