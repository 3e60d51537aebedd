#!/usr/bin/env bash
# One prepared check for a lent GPU (H100/H200, torch + triton, no DALI, no network). Under 8 minutes.
#
#   OUT=/some/dir bash bench/gpu_check.sh            # on the GPU machine, from the repo root
#   bash bench/gpu_check.sh --dry-run                # same stages on the CPU, tiny (or FASTFT_GPU_CHECK_CPU=1)
#
# Stages (each under `timeout`, all inside one global deadline; a failed stage prints and the rest go on):
#   env        torch/torchvision/tqdm import, the GPU's name; fails fast, since nothing else can run
#   data       the chapter's shape: 2,000 train / 800 test web-like synthetic JPEGs
#   bench      fastft bench: every strategy at 224 px, batch 256, bf16, channels_last, compile,
#              and the d2l-style reference (fp32, NCHW, eager, torch loader) in the same call
#   step       finetune: the engine's step on a fixed device batch vs its steady epoch on real data
#              (is the data path the bottleneck?), and MFU at 3 x 2 x 1.82 GFLOP per 224-px example
#   optim      torch SGD (fused) vs apex FusedSGD, when apex imports
#   ddp        the same eager finetune run plain and under torchrun with 1 rank (NCCL): DDP's own cost
#   summary    a short table, printed LAST; everything also lands as JSON under $OUT
# fastft need not be installed: PYTHONPATH=$PWD. tqdm missing on the machine? From a machine with a
# registry: `pip install --no-deps --target bench/.vendor tqdm`, and carry bench/.vendor along.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/bench/.vendor${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

DRY=0
[[ "${1:-}" == "--dry-run" || "${FASTFT_GPU_CHECK_CPU:-0}" == "1" ]] && DRY=1
OUT="${OUT:-$(mktemp -d /tmp/fastft-gpu-check.XXXXXX)}"
mkdir -p "$OUT"
if (( DRY )); then  # tiny, CPU, eager: checks the plumbing, not the speed
    DEVICE=cpu SIZE=32 BATCH=8 TRAIN=16 TEST=8 AMP=off COMPILE=--no-compile STEPS=2 BUDGET=420
else
    DEVICE=cuda SIZE=224 BATCH=256 TRAIN=2000 TEST=800 AMP=bf16 COMPILE=--compile STEPS=20 BUDGET=450
fi
DATA="$OUT/data"
DEADLINE=$(( $(date +%s) + BUDGET ))   # 7.5 min of stages leaves room for start-up under 8 min
COMMON=(--device "$DEVICE" --image-size "$SIZE" --batch-size "$BATCH" --amp "$AMP" "$COMPILE")

# stage NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, never stops the script.
stage() {
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    (( limit > left )) && limit=$left
    if (( limit < 5 )); then echo "== $name: skipped, global deadline reached" | tee -a "$OUT/stages.txt"; return 0; fi
    echo "== $name (up to ${limit}s): $*"
    local start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local note="ok"; (( rc == 124 || rc == 137 )) && note="TIMED OUT"; (( rc != 0 && rc != 124 && rc != 137 )) && note="FAILED"
    echo "$name: $note (rc $rc, $(( $(date +%s) - start ))s)" | tee -a "$OUT/stages.txt"
    tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
    return 0
}

# --- env: nothing runs without these; say exactly what is missing -------------------------------
if ! python - "$DRY" >"$OUT/env.txt" 2>&1 <<'EOF'
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
    cat "$OUT/env.txt"; echo "gpu_check: environment not usable, stopping"; exit 3
fi
cat "$OUT/env.txt"

stage data 60 python -m fastft data synth "$DATA" --train "$TRAIN" --test "$TEST"

# Partial JSON survives a timeout: fastft bench rewrites it after every strategy, finetune first.
stage bench 240 python -m fastft bench --data "$DATA" "${COMMON[@]}" --epochs 2 --json "$OUT/bench.json"

stage step 75 python bench/strategies.py step-vs-data --data "$DATA" "${COMMON[@]}" --steps "$STEPS" \
    --strategy finetune --work "$OUT/step-runs" --out "$OUT/step_vs_data.json"

if grep -q "apex yes" "$OUT/env.txt"; then
    stage optim 50 python bench/strategies.py optimizers --data "$DATA" "${COMMON[@]}" --steps "$STEPS" \
        --work "$OUT/optim-runs" --out "$OUT/optimizers.json"
else
    echo "optim: skipped, apex does not import (not on PyPI; see fastft/optim.py)" | tee -a "$OUT/stages.txt"
fi

# --- dali: the mixed (nvJPEG + hardware decoder) pipeline against the torch loader -----------------
# Only where DALI imports: it is not on the lent machine and its wheels (~400 MB) exceed what one
# call carries (64 MiB); see bench/README.md, "DALI on the lent GPU".
if grep -q "dali yes" "$OUT/env.txt"; then
    stage dali 60 python bench/loaders.py --data "$DATA" --device "$DEVICE" --image-size "$SIZE" \
        --batch-size "$BATCH" --amp "$AMP" --prefetch 2,3 --epochs 2 --json "$OUT/loaders.json"
else
    echo "dali: skipped, nvidia.dali does not import here" | tee -a "$OUT/stages.txt"
fi

# --- ddp: the DDP wrapper's own cost, 1 process (NCCL) against no wrapper ---------------------------
# Eager on both sides, so the comparison is the wrapper and its all-reduce, not compile time;
# bench/README.md ("DDP scaling") turns these two figures into the expected 4-GPU rate.
TRAIN_ARGS=(train --data "$DATA" --strategy finetune --weights none --epochs 2 --device "$DEVICE"
            --image-size "$SIZE" --batch-size "$BATCH" --amp "$AMP" --no-compile)
stage ddp_plain 45 python -m fastft "${TRAIN_ARGS[@]}" --out "$OUT/ddp/plain"
stage ddp_1rank 55 python -m torch.distributed.run --standalone --nproc_per_node=1 \
    -m fastft "${TRAIN_ARGS[@]}" --out "$OUT/ddp/1rank"
# --- end of SLOT -----------------------------------------------------------------------------------

python - "$OUT" "$DRY" <<'EOF'
import json, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
report = {"bench": load(out / "bench.json"), "loaders": load(out / "loaders.json"), "step_vs_data": load(out / "step_vs_data.json"),
          "optimizers": load(out / "optimizers.json"),
          "ddp": {k: load(out / "ddp" / k / "summary.json") for k in ("plain", "1rank")},
          "stages": (out / "stages.txt").read_text().splitlines()}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print("\n" + "=" * 30, "gpu_check summary (dry run, CPU)" if dry else "gpu_check summary", "=" * 30)
print("\n".join(report["stages"]))
targets = {} if dry else {"finetune": 12000, "frozen": 30000}
bench = report["bench"]
if bench:
    print(f"bench: {bench['header']['device']}, {bench['header']['image_size']} px, batch "
          f"{bench['header']['batch_size']}{'' if bench['complete'] else ' (INCOMPLETE: timed out)'}")
    print(f"{'strategy':10} {'e2e/s':>9} {'ref e2e/s':>9} {'x e2e':>6} {'compute/s':>10} {'x comp':>7} "
          f"{'compile s':>9} {'recomp':>6} {'target':>7}")
    for row in bench["rows"]:
        if "error" in row:
            print(f"{row['strategy']:10} failed: {row['error']}")
            continue
        f, r = row["fastft"], row["reference"]
        med = lambda s: float("nan") if s is None else s["median"]
        target = targets.get(row["strategy"])
        print(f"{row['strategy']:10} {med(f['examples_per_sec']):9.0f} {med(r['examples_per_sec']):9.0f} "
              f"{row['speedup_e2e']:6.2f} {med(f['examples_per_sec_compute']):10.0f} {row['speedup_compute']:7.2f} "
              f"{med(f['compile_s']):9.1f} {med(f['recompiles']):6.0f} {target or '':>7}")
step = report["step_vs_data"]
if step:
    mfu = "n/a" if step["mfu"] is None else f"{step['mfu']:.1%}"
    print(f"step ({step['strategy']}, {step['loader']} loader): device batch {step['device_tensor_step_ms']:.1f} ms, "
          f"real data {step['real_data_step_ms']:.1f} ms/step (x{step['data_overhead']:.2f}); "
          f"{step['achieved_tflops']:.1f} TFLOP/s, MFU {mfu} of {step['peak']}")
for row in (report["loaders"] or {}).get("rows", []):
    print(f"loader {row['loader']:5} {row['split']:5} {row['setting']:30} {row['images_per_s']:9.0f} img/s")
if report["optimizers"]:
    print("optimizers:", json.dumps(report["optimizers"]))
ddp = report["ddp"]
if all(ddp.values()):
    plain, one = (ddp[k]["examples_per_sec_compute"] for k in ("plain", "1rank"))
    print(f"ddp (eager, compute-only): plain {plain:.0f}/s, 1-rank DDP {one:.0f}/s "
          f"(wrapper cost {1 - one / plain:+.1%}); end-to-end {ddp['plain']['examples_per_sec']:.0f} "
          f"vs {ddp['1rank']['examples_per_sec']:.0f}/s")
print(f"JSON: {out / 'gpu_check.json'}")
EOF
