#!/usr/bin/env bash
# For the day a GPU comes: one command that checks the CUDA path on it and writes one
# report (default gpu_check_report.txt). It needs a CUDA build of torch installed,
# nvcc, and compute-sanitizer (CUDA toolkit). Every step runs even if one fails; the
# exit status is 1 when any failed.
#
#   bench/gpu_check.sh [report]
#
# Steps: build treepool (CUDAExtension); the whole test suite (every CUDA test runs
# when a GPU is present); compute-sanitizer memcheck and racecheck over the CUDA tests;
# bench_ops on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
report="$(realpath -m "${1:-gpu_check_report.txt}")"
status=0

step() {  # step NAME COMMAND...: runs it, its output and its result go into the report
  local name="$1"
  shift
  echo "=== $name: $*" | tee -a "$report"
  "$@" >>"$report" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "=== $name: ok" | tee -a "$report"
  else
    echo "=== $name: FAILED (exit $rc)" | tee -a "$report"
    status=1
  fi
}

: >"$report"
step "machine" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step "build" python3 -m pip install --quiet --no-build-isolation -e ".[test]"
step "info" python3 -m treepool info
step "suite" python3 -m pytest python_tests -q
sanitize=(compute-sanitizer --error-exitcode 1 --target-processes all)
step "memcheck" "${sanitize[@]}" --tool memcheck python3 -m pytest python_tests/ops/test_ops_cuda.py -q -x
step "racecheck" "${sanitize[@]}" --tool racecheck python3 -m pytest python_tests/ops/test_ops_cuda.py -q -x
step "bench_ops" python3 bench/bench_ops.py --device cuda --dtypes float32,float16,bfloat16
echo "gpu check: $([ "$status" -eq 0 ] && echo all steps ok || echo some steps FAILED); report: $report"
exit "$status"
