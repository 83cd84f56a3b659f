#!/usr/bin/env bash
# The one prepared device run of issue 11 (H100/H200, 16 cores, no network), well under 9 minutes:
#   1. builds zoo's CUDA extension and, at the same time, mamba-ssm's selective_scan from the sdist in
#      .device/ (ignored by git; `pip download mamba-ssm==2.3.2.post1 --no-deps --no-binary :all:
#      --no-build-isolation -d .device/`),
#   2. pytest -m cuda with the new kernels on (ZOO_CUDA_SCAN=lparallel: L-parallel scan, fused CUDA mixer),
#   3. bench_scan.py (lparallel, then default), the Vim mixer timing, bench_models.py on zoo's kernels
#      and on the mamba-ssm adapter, a bf16 Vim-Ti run, the engine's step time with a host sync every step
#      vs every 50 (bench_train_step.py, issue 17), then as time allows pytest -m cuda on the
#      default kernel, its model figures, and compiled (torch.compile) model figures on both sides,
#   4. $OUT/result.json (issue 11's schema) + $OUT/result.md, rewritten after every step; benchmarks
#      write their JSON after every row, so a step that times out keeps what it measured.
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

# step NAME TIMEOUT_S CMD...: runs CMD (a program, not a shell function: `timeout` execs it) with a
# timeout, logs to $OUT/NAME.log, records rc and seconds, rewrites the report; returns CMD's rc
step() {
  local name=$1 limit=$2
  shift 2
  local now=$(( $(date +%s) - START ))
  if (( now + 10 > BUDGET_S )); then
    echo "$name skipped (budget: ${now}s of ${BUDGET_S}s used)" >> "$OUT/steps.txt"
    return 99
  fi
  (( limit > BUDGET_S - now )) && limit=$(( BUDGET_S - now ))
  local t0=$(date +%s) rc
  if (( DRY )); then  # the command is not run, but it must be something timeout can start
    echo "[dry-run] $*" > "$OUT/$name.log"
    type -P "$1" > /dev/null; rc=$?
  else
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
  fi
  local why=""
  (( rc == 124 || rc == 137 )) && why=" TIMED OUT"
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)$why" >> "$OUT/steps.txt"
  report
  return $rc
}

report() { "$PY" benchmarks/device_report.py report --dir "$OUT" > /dev/null 2>> "$OUT/report_errors.log"; }

"$PY" - > "$OUT/meta.json" <<'EOF'
import json, torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
print(json.dumps(dict(device=dev, torch=torch.__version__, cuda=torch.version.cuda)))
EOF

# 1. builds, in parallel: zoo's CPU + CUDA libraries (the .cu files in parallel, each split over 8
#    processes) and mamba-ssm's selective_scan (ninja, 16 jobs); the tests start as soon as zoo's is
#    done, the mamba-ssm build keeps going until the benchmarks need it
if [[ -n "$MAMBA_TGZ" ]]; then
  (( DRY )) || tar -xzf "$MAMBA_TGZ" -C "$ROOT/.device"  # a dry run leaves .device/ as carried: the sdist only
  step build_mamba 300 "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from bench_scan import load_mamba
assert load_mamba() is not None" &
  MAMBA_PID=$!
else
  echo "build_mamba skipped (no mamba_ssm-*.tar.gz in .device/): no mamba-ssm columns" >> "$OUT/steps.txt"
  MAMBA_PID=
fi
step build_zoo 300 env NVCC_APPEND_FLAGS="--split-compile=8" "$PY" -c "
from zoo.ops import _build
for kind in ('cpu', 'cuda'):
    ok, why = _build.ensure_loaded(kind); print(kind, ok, why, flush=True); assert ok, why"
ZOO_RC=$?
if (( ZOO_RC != 0 )); then  # every later step would try the same build again, each up to its timeout
  echo "zoo build failed (rc=$ZOO_RC, see build_zoo.log): no further step" >> "$OUT/steps.txt"
  # stop the mamba-ssm build: its `timeout` (a child of that step's subshell) signals its whole group
  [[ -n "$MAMBA_PID" ]] && { pkill -TERM -P "$MAMBA_PID" 2> /dev/null; wait "$MAMBA_PID"; }
  report; cat "$OUT/steps.txt"; cat "$OUT/result.md"
  exit 1
fi

# 2. tests, -v so a run cut short still lists its outcomes: new kernels on (the L-parallel scan and the
#    fused CUDA mixer); the default kernel's run comes after the main benchmarks (it ran on devices before)
step pytest_lparallel 150 env ZOO_CUDA_SCAN=lparallel "$PY" -m pytest -v -p no:cacheprovider -m cuda -ra \
  tests/test_kernels_cuda.py tests/test_mixer_cuda.py

# mamba-ssm: ready, or its columns stay empty and no step tries to build it again
MAMBA_OK=0
if [[ -n "$MAMBA_PID" ]]; then wait "$MAMBA_PID" && MAMBA_OK=1; fi
if (( ! MAMBA_OK )); then
  unset MAMBA_SSM_SRC
  NO_MAMBA=--no-mamba
  echo "mamba-ssm not built: scan/mixer/model steps run zoo only" >> "$OUT/steps.txt"
else
  NO_MAMBA=
fi

# 3. benchmarks (each rewrites its JSON after every row)
step scan_lparallel 60 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_scan.py $NO_MAMBA \
  --json "$OUT/scan_lparallel.json"
step scan_default 45 env ZOO_CUDA_SCAN=default "$PY" benchmarks/bench_scan.py --no-mamba --json "$OUT/scan_default.json"
step mixer 45 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/device_report.py mixer --json "$OUT/mixer.json"
MODELS=Vim-Ti,DeiT-Ti,DeiT-S,MSVMamba-T,ConvNeXt-T
step models_lparallel 75 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_models.py --labels "$MODELS" \
  --json "$OUT/models_lparallel.json"
(( MAMBA_OK )) && step models_mamba 60 "$PY" benchmarks/bench_models.py --labels Vim-Ti,MSVMamba-T \
  --backend mamba_ssm --json "$OUT/models_mamba.json"
step train 60 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/device_report.py train --steps 500 --json "$OUT/train.json"
step train_sync 50 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_train_step.py --model vim_tiny_patch16_224 \
  --batch 128 --steps 30 --rounds 2 --json "$OUT/train_sync.json"
step pytest_default 60 env ZOO_CUDA_SCAN=default "$PY" -m pytest -v -p no:cacheprovider -m cuda -ra \
  -k "not lparallel" tests/test_kernels_cuda.py
step models_default 45 env ZOO_CUDA_SCAN=default "$PY" benchmarks/bench_models.py --labels Vim-Ti,MSVMamba-T \
  --json "$OUT/models_default.json"
step models_lparallel_compiled 60 env ZOO_CUDA_SCAN=lparallel "$PY" benchmarks/bench_models.py \
  --labels Vim-Ti,MSVMamba-T --compile default --json "$OUT/models_lparallel_compiled.json"
(( MAMBA_OK )) && step models_mamba_compiled 60 "$PY" benchmarks/bench_models.py --labels Vim-Ti,MSVMamba-T \
  --backend mamba_ssm --compile default --json "$OUT/models_mamba_compiled.json"

if (( DRY )); then  # exercise the report on a tiny real CPU training run and a synthetic scan row
  ZOO_SCAN_BACKEND=reference "$PY" benchmarks/device_report.py train --steps 2 --batch 2 --img-size 32 \
    --json "$OUT/train.json" > /dev/null
  ZOO_SCAN_BACKEND=reference "$PY" benchmarks/bench_train_step.py --model test_vim --img-size 32 --batch 4 \
    --steps 2 --rounds 1 --amp none --json "$OUT/train_sync.json" > /dev/null
  echo '{"rows": [{"shape": "dry", "fwd_ms": 1.0, "fwdbwd_ms": 2.0, "mamba_fwd_ms": 2.0, "mamba_fwdbwd_ms": 4.0}]}' \
    > "$OUT/scan_lparallel.json"
fi
echo "total $(( $(date +%s) - START ))s" >> "$OUT/steps.txt"
report
echo "=== steps ($OUT/steps.txt)"; cat "$OUT/steps.txt"
echo "=== report ($OUT/result.md; commit $(ls "$OUT"/20*-*.json 2> /dev/null | head -1) as benchmarks/results/)"
cat "$OUT/result.md"
[[ -s "$OUT/report_errors.log" ]] && { echo "=== report errors"; tail -20 "$OUT/report_errors.log"; }
exit 0
