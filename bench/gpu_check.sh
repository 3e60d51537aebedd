#!/usr/bin/env bash
# One prepared check for a lent GPU (H100/H200, torch + triton, no DALI, no network). Under 8 minutes.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   OUT=$(mktemp -d) bash bench/gpu_check.sh --dry-run   # same stages on the CPU, tiny (or FASTFT_GPU_CHECK_CPU=1)
#
# What comes back: only a few small files can leave the GPU machine (at most 8, each under 16 MiB),
# so data, checkpoints, run folders and full logs live in a temporary folder removed at exit, and
# $OUT holds exactly three files:
#   gpu_check.json   every figure so far (bench/gpu_report.py rewrites it after every stage)
#   stages.txt       one line per stage: ok / FAILED / TIMED OUT / skipped, rc, seconds
#   log_tail.txt     the last 30 lines of each stage's log
#
# Stages, most important figures first; each under `timeout`, all inside one global deadline, so a
# slow compile cuts the last stages, not the first. A failed stage prints and the rest go on, and the
# table is printed after every stage and LAST:
#   env        torch/torchvision/tqdm import, the GPU's name; fails fast, since nothing else can run
#   data       the chapter's shape: 2,000 train / 800 test web-like synthetic JPEGs
#   job_cold   `fastft train` as a user runs it: finetune, 5 epochs, 224 px, batch 128, every default
#              (compile auto), an empty compile cache: job_s from the command to the summary (< 30 s)
#   job_warm   the same command again, its compile cache now warm (< 10 s)
#   e2e        fastft bench, finetune and frozen: 224 px, batch 256, bf16, channels_last, compile,
#              against the d2l-style reference (fp32, NCHW, eager, torch loader) in the same call
#   step       finetune and frozen: the engine's step on a fixed device batch vs its steady epoch on
#              real data (the data path's share of the step), and MFU
#   kernel     the cached loader's fused crop kernel against its torch reference and torchvision's loop
#   step_torch step-vs-data again, fed by the torch loader: the d2l data path's share beside cached's
#   rest       fastft bench, the other strategies (hotdog, scratch, partial:2)
#   optim      torch SGD (fused) vs apex FusedSGD, when apex imports
#   dali       DALI's pipeline against the torch loader, and dali_handoff (no buffer torch holds is
#              rewritten), only where DALI imports
#   ddp        the same eager finetune run plain and under torchrun with 1 rank (NCCL): DDP's own cost
# fastft need not be installed: PYTHONPATH=$PWD. tqdm missing on the machine? From a machine with a
# registry: `pip install --no-deps --target bench/.vendor tqdm`, and carry bench/.vendor along.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/bench/.vendor${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"   # the GPU machine may have no `python`
STARTED=$(date +%s)

DRY=0
[[ "${1:-}" == "--dry-run" || "${FASTFT_GPU_CHECK_CPU:-0}" == "1" ]] && DRY=1
OUT="${OUT:-$(mktemp -d /tmp/fastft-gpu-check-out.XXXXXX)}"
mkdir -p "$OUT"
rm -f "$OUT/gpu_check.json" "$OUT/stages.txt" "$OUT/log_tail.txt"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastft-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 143' TERM INT   # still runs the EXIT trap
mkdir -p "$WORK/logs" "$WORK/runs"

if (( DRY )); then  # tiny, CPU, eager: checks the plumbing, not the speed; 2 shared cores are slow
    DEVICE=cpu SIZE=32 BATCH=8 TRAIN=16 TEST=8 AMP=off COMPILE=--no-compile STEPS=2 BUDGET=${BUDGET:-900}
    JOB_BATCH=8 JOB_EPOCHS=2
else
    DEVICE=cuda SIZE=224 BATCH=256 TRAIN=2000 TEST=800 AMP=bf16 COMPILE=--compile STEPS=20 BUDGET=${BUDGET:-450}
    JOB_BATCH=128 JOB_EPOCHS=5   # the chapter's job: 5 epochs, batch 128
fi
DATA="$WORK/data"
DEADLINE=$(( STARTED + BUDGET ))   # 7.5 min of stages and reports leaves room for start-up under 8 min
RESERVE=20                         # s kept back: a stage's kill grace (10 s) and the last report
COMMON=(--device "$DEVICE" --image-size "$SIZE" --batch-size "$BATCH" --amp "$AMP" "$COMPILE")
REPORT=("$PY" bench/gpu_report.py "$WORK" "$OUT")
(( DRY )) && REPORT+=(--dry-run)

note() { echo "$*" | tee -a "$OUT/stages.txt"; }

# stage NAME LIMIT_S CMD...: CMD's output goes to $WORK/logs/NAME.log; never stops the script.
# Afterwards: its status line, its log tail (screen: 4 lines; log_tail.txt: 30), and the table.
stage() {
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - RESERVE - $(date +%s) ))
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then note "$name: skipped, global deadline reached"; return 0; fi
    echo "== $name (up to ${limit}s): $*"
    local start log="$WORK/logs/$name.log"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$? status="ok"
    (( rc == 124 || rc == 137 )) && status="TIMED OUT"
    (( rc != 0 && rc != 124 && rc != 137 )) && status="FAILED"
    note "$name: $status (rc $rc, $(( $(date +%s) - start ))s of ${limit}s)"
    { echo "== $name: $status (rc $rc)"; tail -n 30 "$log"; } >>"$OUT/log_tail.txt"
    tail -n 4 "$log" | sed 's/^/    /'
    "${REPORT[@]}" --title "gpu_check after $name"
    return 0
}

# --- env: nothing runs without these; say exactly what is missing -------------------------------
if ! "$PY" - "$DRY" >"$WORK/env.txt" 2>&1 <<'EOF'
import sys
missing = []
for module in ("torch", "torchvision", "numpy", "PIL", "tqdm"):
    try:
        __import__(module)
    except ImportError as exc:
        missing.append(f"{module} ({exc})")
if missing:
    sys.exit("missing: " + ", ".join(missing) + "; tqdm: pip install --no-deps --target bench/.vendor tqdm "
             "where a registry is reachable, then carry bench/.vendor")
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
if sys.argv[1] == "0":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible; run with --dry-run for the CPU check")
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
    try:
        import triton
        print("triton", triton.__version__)
    except ImportError:
        sys.exit("triton does not import: torch.compile cannot run on this GPU")
try:
    import apex.optimizers  # noqa: F401
    print("apex yes")
except ImportError:
    print("apex no")
try:
    import nvidia.dali  # noqa: F401
    print("dali yes", nvidia.dali.__version__)
except ImportError:
    print("dali no")
EOF
then
    cat "$WORK/env.txt"; { echo "== env: FAILED"; cat "$WORK/env.txt"; } >>"$OUT/log_tail.txt"
    note "env: FAILED, environment not usable; stopping"
    "${REPORT[@]}" --title "gpu_check"; exit 3
fi
cat "$WORK/env.txt"
{ echo "== env"; cat "$WORK/env.txt"; } >>"$OUT/log_tail.txt"
note "env: ok ($(head -n 1 "$WORK/env.txt"))"

stage data 60 "$PY" -m fastft data synth "$DATA" --train "$TRAIN" --test "$TEST"

# --- the whole job as a user runs it, command to summary: cold (empty compile cache), then warm ------
# The chapter-size finetune job with every default (--compile auto, --loader auto, --amp auto); the
# fresh XDG_CACHE_HOME makes the first run compile cold and the second find its cache.
JOB_ARGS=(-m fastft train --data "$DATA" --strategy finetune --weights none --device "$DEVICE"
          --image-size "$SIZE" --batch-size "$JOB_BATCH" --epochs "$JOB_EPOCHS")
XDG_CACHE_HOME="$WORK/xdg" stage job_cold 120 "$PY" "${JOB_ARGS[@]}" --out "$WORK/runs/job_cold"
XDG_CACHE_HOME="$WORK/xdg" stage job_warm 60 "$PY" "${JOB_ARGS[@]}" --out "$WORK/runs/job_warm"

# --- the figures that matter most: finetune and frozen end to end, then the data path's share ------
# fastft bench rewrites its JSON after every strategy, so a cut stage keeps finetune.
stage e2e 200 "$PY" -m fastft bench --data "$DATA" "${COMMON[@]}" --strategies finetune,frozen --epochs 2 \
    --json "$WORK/bench_e2e.json"
stage step 100 "$PY" bench/strategies.py step-vs-data --data "$DATA" "${COMMON[@]}" --steps "$STEPS" \
    --strategy finetune,frozen --work "$WORK/runs/step" --out "$WORK/step_vs_data.json"

# --- the cached loader (issue 11): the fused crop kernel against its torch reference, torchvision's
# per-image loop (and DALI where it imports), then the same step-vs-data rows fed by the torch loader.
# `auto` is the cached loader where it fits, so e2e and step above already ran on it: step_torch is the
# d2l data path under the same step, and the two data shares side by side are the loader's gain.
stage kernel 60 "$PY" bench/kernels.py --device "$DEVICE" --size "$SIZE" --batch "$BATCH" --iters 20 \
    --json "$WORK/kernels.json"
stage step_torch 100 "$PY" bench/strategies.py step-vs-data --data "$DATA" "${COMMON[@]}" --steps "$STEPS" \
    --strategy finetune,frozen --loader torch --work "$WORK/runs/step_torch" --out "$WORK/step_vs_data_torch.json"

# --- the rest: other strategies, apex, DALI, DDP ------------------------------------------------------
stage rest 150 "$PY" -m fastft bench --data "$DATA" "${COMMON[@]}" --strategies hotdog,scratch,partial:2 \
    --epochs 2 --json "$WORK/bench_rest.json"

if grep -q "apex yes" "$WORK/env.txt"; then
    stage optim 50 "$PY" bench/strategies.py optimizers --data "$DATA" "${COMMON[@]}" --steps "$STEPS" \
        --work "$WORK/runs/optim" --out "$WORK/optimizers.json"
else
    note "optim: skipped, apex does not import (not on PyPI; see fastft/optim.py)"
fi

# DALI only where it imports: it is not on the lent machine and its wheels (~400 MB) exceed what one
# call carries (64 MiB); see bench/README.md, "DALI on the lent GPU".
if grep -q "dali yes" "$WORK/env.txt"; then
    stage dali 60 "$PY" bench/loaders.py --data "$DATA" --device "$DEVICE" --image-size "$SIZE" \
        --batch-size "$BATCH" --amp "$AMP" --prefetch 2,3 --epochs 2 --json "$WORK/loaders.json"
    # fp32 (--amp off): torch then holds DALI's own buffers; a bf16 batch is already torch's copy.
    stage dali_handoff 45 "$PY" bench/dali_handoff.py --data "$DATA" --device "$DEVICE" --image-size "$SIZE" \
        --batch-size "$BATCH" --amp off --epochs 2 --hold 4 --json "$WORK/dali_handoff.json"
else
    note "dali: skipped, nvidia.dali does not import here (dali and dali_handoff)"
fi

# DDP's own cost, 1 process (NCCL) against no wrapper. Eager on both sides, so the comparison is the
# wrapper and its all-reduce, not compile time; bench/README.md ("DDP scaling") turns these two
# figures into the expected 4-GPU rate.
TRAIN_ARGS=(train --data "$DATA" --strategy finetune --weights none --epochs 2 --device "$DEVICE"
            --image-size "$SIZE" --batch-size "$BATCH" --amp "$AMP" --no-compile)
stage ddp_plain 45 "$PY" -m fastft "${TRAIN_ARGS[@]}" --out "$WORK/runs/ddp/plain"
stage ddp_1rank 55 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m fastft "${TRAIN_ARGS[@]}" --out "$WORK/runs/ddp/1rank"

note "total: $(( $(date +%s) - STARTED ))s (deadline ${BUDGET}s)"
"${REPORT[@]}" --title "gpu_check summary (FINAL)"
