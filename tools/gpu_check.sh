#!/usr/bin/env bash
# One-shot GPU check for an H100 machine without package-registry access (docs/ARCHITECTURE.md, "GPU machine"):
#   1. install torch-pruning + jsonargparse (and jsonargparse's signature extras if missing) from wheels/
#   2. install this repo (--no-deps, editable; PYTHONPATH fallback)
#   3. pytest -m cuda
#   4. tools/bench.py train --config gpu-7b             (eager), then --compile-only (torch.compile)
#   5. tools/bench.py long-context --config long-context-7b   (memory and step time, 512..8192 tokens, frozen /
#      S²FT / S²FT chunked loss / LoRA / LoRA chunked / full, without and with checkpointing)
#      tools/bench.py train --config sweep              (512..4096 tokens, eager, incl. LoRA all-linear)
#      tools/bench.py profile --config gpu-7b           (phase x op-kind breakdown, if time is left)
#   6. plots
# Everything lands in $OUT (default ./out); the whole script stays within ~8 minutes (timeout per stage).
# GPU_CHECK_DRY=1: CPU dry run of the same logic (pip --dry-run, tiny CPU bench instead of the GPU stages);
# GPU_CHECK_FORCE_WHEELS=1 installs every carried wheel even when the package already imports.
# Stage budgets (s) can be changed with T_PYTEST, T_7B, T_LONG, T_7B_COMPILE, T_SWEEP, T_PROFILE; TOTAL_S caps the
# whole script.
# Bring the wheels with tools/fetch_wheels.sh (on a machine with registry access).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
TOTAL_S=${TOTAL_S:-470}
T_PYTEST=${T_PYTEST:-90}
T_7B=${T_7B:-90}
T_LONG=${T_LONG:-180}
T_7B_COMPILE=${T_7B_COMPILE:-190}
T_SWEEP=${T_SWEEP:-90}
T_PROFILE=${T_PROFILE:-60}
START=$(date +%s)
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1

export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # works even when the editable install fails
export TRITON_INTERPRET=0                               # real kernels on the GPU (conftest defaults it to 1)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
FAILED=0

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
record() { echo "$1: $2" >>"$SUMMARY"; say "stage $1: $2"; [ "$2" = ok ] || FAILED=1; }
# Run a stage under `timeout`, never past the total budget: budget NAME SECONDS CMD...
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((TOTAL_S - ($(date +%s) - START) - 5))
  if [ "$left" -lt 20 ]; then record "$name" "skipped (total budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "stage $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 0 ]; then record "$name" ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then record "$name" "timeout after ${limit}s"
  else record "$name" "failed (rc=$rc)"; fi
}

say "OUT=$OUT DRY=$DRY python=$($PY -c 'import sys; print(sys.version.split()[0])')"
{
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  $PY -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda,
"gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
  $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|lightning|transformers|peft|safetensors|jsonargparse|torch.pruning|docstring|typeshed|numpy|pyyaml) "
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$DRY" != 1 ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  say "error: no CUDA GPU visible to torch; run with GPU_CHECK_DRY=1 for the CPU dry run"
  record cuda "failed (no GPU)"
  exit 2
fi

# ---- 1. wheels
wheel() { ls "$REPO"/wheels/"$1"-*.whl 2>/dev/null | sort | tail -1; }
missing=()
for w in torch_pruning jsonargparse; do [ -n "$(wheel $w)" ] || missing+=("$w"); done
if [ ${#missing[@]} -gt 0 ]; then
  say "error: wheels/ lacks ${missing[*]}: run tools/fetch_wheels.sh on a machine with registry access" \
    "and carry the wheels/ folder with the repo (this machine cannot download them)"
  record wheels "failed (missing: ${missing[*]})"
  exit 3
fi
to_install=()
# Module name == wheel name prefix for all of these; only the ones that do not import get installed, and
# pip picks the wheel matching this Python from wheels/ (hypothesis is compiled: one wheel per CPython).
for mod in torch_pruning jsonargparse docstring_parser typeshed_client pytest pluggy iniconfig pygments \
  hypothesis sortedcontainers; do
  whl=$mod
  if [ "${GPU_CHECK_FORCE_WHEELS:-0}" != 1 ] && $PY -c "import $mod" 2>/dev/null; then
    say "$mod already importable: keeping it"
  elif [ -n "$(wheel "$whl")" ]; then
    to_install+=("$mod")
  else
    say "warning: $mod is not installed and wheels/ has no $whl wheel (jsonargparse signatures may fail)"
  fi
done
if [ ${#to_install[@]} -eq 0 ]; then
  record wheels ok
elif [ "$DRY" = 1 ]; then
  stage wheels 60 $PY -m pip install --dry-run --no-index --no-deps --find-links "$REPO/wheels" "${to_install[@]}"
else
  stage wheels 60 $PY -m pip install --no-index --no-deps --find-links "$REPO/wheels" "${to_install[@]}"
fi

# ---- 2. the package itself
if [ "$DRY" = 1 ]; then
  say "dry run: skipping 'pip install --no-deps --no-build-isolation -e .' (PYTHONPATH=$REPO is set)"
  record install ok
else
  stage install 60 $PY -m pip install --no-index --no-deps --no-build-isolation -e . ||
    true
fi
$PY -c 'import s2ft_lightning, surgery, torch_pruning, jsonargparse; print("imports ok")' ||
  say "warning: imports failed; the stages below will show why"

# ---- 3. CUDA tests (rc 5 = nothing selected: fine on a CPU dry run, where every cuda test skips)
PYTEST_OK="0"
[ "$DRY" = 1 ] && PYTEST_OK="0|5"
stage pytest_cuda "$T_PYTEST" bash -c "$PY -m pytest -m cuda -q -p no:cacheprovider \
  --junitxml='$OUT/pytest_cuda.xml' >'$OUT/pytest_cuda.txt' 2>&1; rc=\$?; tail -25 '$OUT/pytest_cuda.txt'; \
  [[ \$rc =~ ^($PYTEST_OK)\$ ]]"

# ---- 4-5. benchmarks (each writes its JSON after every mode, so a timeout keeps what was measured)
if [ "$DRY" = 1 ]; then
  stage bench_train "$T_7B" $PY tools/bench.py train --config tiny --modes frozen s2ft lora --steps 2 \
    --warmup 1 --out "$OUT/train-tiny.json"
  stage bench_long_context "$T_LONG" $PY tools/bench.py long-context --config long-context-tiny \
    --modes frozen s2ft-chunked lora --seq 32 64 --steps 1 --warmup 0 --no-isolate --out "$OUT/long-context-tiny.json"
  stage bench_sweep "$T_SWEEP" $PY tools/bench.py train --config tiny --modes frozen s2ft --seq 16 32 \
    --steps 1 --warmup 0 --no-isolate --out "$OUT/train-tiny-sweep.json"
  stage profile "$T_PROFILE" $PY tools/bench.py profile --config tiny --modes frozen s2ft lora --steps 1 \
    --out "$OUT/profile-tiny.json"
else
  # Compiled modes in target order: a timeout then drops the least needed ones (full, lora_all).
  stage bench_gpu_7b "$T_7B" $PY tools/bench.py train --config gpu-7b --out "$OUT/train-gpu-7b.json"
  # Long sequences (issue #25): series in target order, the JSON rewritten after each, so a timeout keeps them.
  stage bench_long_context "$T_LONG" $PY tools/bench.py long-context --config long-context-7b \
    --out "$OUT/long-context-7b.json"
  # auto = torch reference on CUDA until measured: the same step with the Triton block-gradient kernels.
  stage bench_gpu_7b_triton 60 env S2FT_KERNELS=triton $PY tools/bench.py train --config gpu-7b \
    --modes frozen s2ft --out "$OUT/train-gpu-7b-triton.json"
  stage bench_gpu_7b_compile "$T_7B_COMPILE" $PY tools/bench.py train --config gpu-7b --compile-only \
    --modes frozen s2ft lora lora_all full --out "$OUT/train-gpu-7b-compile.json"
  stage bench_sweep "$T_SWEEP" $PY tools/bench.py train --config sweep --out "$OUT/train-sweep.json"
  # Last, with what time is left: where each mode's step goes (explains a missed ratio target).
  stage profile_gpu_7b "$T_PROFILE" $PY tools/bench.py profile --config gpu-7b --modes frozen s2ft lora \
    --steps 3 --out "$OUT/profile-gpu-7b.json"
fi

# ---- 6. plots
shopt -s nullglob
results=("$OUT"/train-*.json "$OUT"/long-context-*.json)
if [ ${#results[@]} -gt 0 ]; then
  stage plots 60 $PY tools/bench.py plot "${results[@]}" --outdir "$OUT"
else
  record plots "skipped (no results)"
fi

say "summary ($(($(date +%s) - START)) s):"
cat "$SUMMARY"
exit $FAILED
