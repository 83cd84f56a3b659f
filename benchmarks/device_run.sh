#!/usr/bin/env bash
# The one prepared device run of issue 11 (H100/H200, 16 cores, no network), well under 9 minutes:
#   1. builds zoo's CUDA extension and, at the same time, mamba-ssm's selective_scan from the sdist in
#      .device/ (ignored by git; `pip download mamba-ssm==2.3.2.post1 --no-deps --no-binary :all:
#      --no-build-isolation -d .device/`),
#   2. pytest -m cuda with the L-parallel kernel on (ZOO_CUDA_SCAN=lparallel) and off,
#   3. bench_scan.py (lparallel, then default), the Vim mixer timing, bench_models.py on zoo's kernel
#      and on the mamba-ssm adapter (eager, then compiled when time is left), a bf16 Vim-Ti run,
#   4. $OUT/result.json (issue 11's schema) + $OUT/result.md, rewritten after every step, so a step
#      that times out still leaves everything before it.
# Every step has its own timeout; the whole run stops starting steps after $BUDGET_S seconds.
#
#   bash benchmarks/device_run.sh            # on the device machine ($OUT from the runner)
#   bash benchmarks/device_run.sh --dry-run  # here, CPU only: the step runner, logs and report writing
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT=${OUT:-$ROOT/.device_out}
mkdir -p "$OUT"
: > "$OUT/steps.txt"
START=$(date +%s)
BUDGET_S=${BUDGET_S:-500}
export PYTHONPATH=$ROOT MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=4
export ZOO_EXT_CACHE=$ROOT/.device/zoo_ext MAMBA_BUILD_DIR=$ROOT/.device/mamba_build
MAMBA_TGZ=$(ls "$ROOT"/.device/mamba_ssm-*.tar.gz 2>/dev/null | head -1)
export MAMBA_SSM_SRC=$ROOT/.device/${MAMBA_TGZ:+$(basename "$MAMBA_TGZ" .tar.gz)}
PY=${PYTHON:-python}

# step NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs to $OUT/NAME.log, records rc and seconds
step() {
  local name=$1 limit=$2
  shift 2
  local now=$(( $(date +%s) - START ))
  if (( now + 10 > BUDGET_S )); then
    echo "$name skipped (budget: ${now}s of ${BUDGET_S}s used)" >> "$OUT/steps.txt"
    return 0
  fi
  (( limit > BUDGET_S - now )) && limit=$(( BUDGET_S - now ))
  local t0=$(date +%s)
  if (( DRY )); then
    echo "[dry-run] $*" > "$OUT/$name.log"
    local rc=0
  else
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
  fi
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)" >> "$OUT/steps.txt"
  report
  return 0
}

report() { "$PY" benchmarks/device_report.py report --dir "$OUT" > /dev/null 2>> "$OUT/report_errors.log"; }

"$PY" - > "$OUT/meta.json" <<'EOF'
import json, torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
print(json.dumps(dict(device=dev, torch=torch.__version__, cuda=torch.version.cuda)))
EOF

# 1. builds, in parallel: zoo (split over 8 processes per .cu) and mamba-ssm (ninja, 16 jobs)
build_zoo() {
  NVCC_APPEND_FLAGS="--split-compile=8" "$PY" -c "
from zoo.ops import _build
ok, why = _build.ensure_loaded('cuda'); print(ok, why); assert ok, why"
}
build_mamba() {
  [[ -n "$MAMBA_TGZ" ]] || { echo "no mamba-ssm sdist in .device/"; return 3; }
  tar -xzf "$MAMBA_TGZ" -C "$ROOT/.device"
  "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from bench_scan import load_mamba
assert load_mamba() is not None"
}
step build_mamba 300 build_mamba &
MAMBA_PID=$!
step build_zoo 300 build_zoo
wait "$MAMBA_PID"

# 2. tests: new kernel on (every test, the lparallel ones included), then the default kernel
step pytest_lparallel 150 env ZOO_CUDA_SCAN=lparallel "$PY" -m pytest -q -m cuda -ra tests/test_kernels_cuda.py
step pytest_default 60 env ZOO_CUDA_SCAN=default "$PY" -m pytest -q -m cuda -ra -k "not lparallel" \
  tests/test_kernels_cuda.py

# 3. benchmarks (each writes its JSON when done)
step scan_lparallel 60 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_scan.py --json "$OUT/scan_lparallel.json"
step scan_default 45 env ZOO_CUDA_SCAN=default "$PY" benchmarks/bench_scan.py --no-mamba --json "$OUT/scan_default.json"
step mixer 30 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/device_report.py mixer --json "$OUT/mixer.json"
MODELS=Vim-Ti,DeiT-Ti,DeiT-S,MSVMamba-T,ConvNeXt-T
step models_lparallel 75 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_models.py --labels "$MODELS" \
  --json "$OUT/models_lparallel.json"
step models_mamba 60 "$PY" benchmarks/bench_models.py --labels Vim-Ti,MSVMamba-T --backend mamba_ssm \
  --json "$OUT/models_mamba.json"
step train 60 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/device_report.py train --steps 500 --json "$OUT/train.json"
step models_default 45 env ZOO_CUDA_SCAN=default "$PY" benchmarks/bench_models.py --labels Vim-Ti,MSVMamba-T \
  --json "$OUT/models_default.json"
step models_lparallel_compiled 60 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_models.py \
  --labels Vim-Ti,MSVMamba-T --compile default --json "$OUT/models_lparallel_compiled.json"

if (( DRY )); then  # exercise the report on a tiny real CPU training run and a synthetic scan row
  ZOO_SCAN_BACKEND=reference "$PY" benchmarks/device_report.py train --steps 2 --batch 2 --img-size 32 \
    --json "$OUT/train.json" > /dev/null
  echo '{"rows": [{"shape": "dry", "fwd_ms": 1.0, "fwdbwd_ms": 2.0, "mamba_fwd_ms": 2.0, "mamba_fwdbwd_ms": 4.0}]}' \
    > "$OUT/scan_lparallel.json"
fi
report
echo "total $(( $(date +%s) - START ))s" >> "$OUT/steps.txt"
report
cat "$OUT/result.md"
