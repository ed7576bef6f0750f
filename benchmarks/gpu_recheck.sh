#!/usr/bin/env bash
# A short GPU re-check after fixing what benchmarks/gpu_suite.sh showed: rebuild bertfast._C (CUDA), report which
# C++ runtime it links, rerun the exception probe and the tests named on the command line (pytest -k expression).
#   benchmarks/gpu_recheck.sh OUTDIR "bad or linear_act"
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_recheck.sh OUTDIR KEXPR}; KEXPR=${2:?pytest -k expression}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"; LOG="$OUT/recheck.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_CACHE_DIR="$PWD/.cache/triton" HF_HOME="$PWD/.cache/hf"
export BERTFAST_CUDA_ARCHS=${BERTFAST_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
START=$(date +%s)
{
  echo "== toolchain: $(c++ --version | head -1)"
  for f in libstdc++.so libstdc++.so.6 libstdc++.a; do echo "  c++ -print-file-name=$f: $(c++ -print-file-name=$f)"; done
  echo "== [$(( $(date +%s) - START ))s] build"
  timeout 240 env BERTFAST_FORCE_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -v -e . 2>&1 | grep -E "bertfast:|rror|-shared" | cut -c1-600
  echo "== [$(( $(date +%s) - START ))s] exception probe"
  timeout 90 $PY -m benchmarks.exception_probe --isolate 2>&1 | grep -v "^  round"
  echo "== [$(( $(date +%s) - START ))s] tests -k '$KEXPR'"
  timeout 150 env OMP_NUM_THREADS=1 $PY -m pytest -q -ra -n 12 -p no:cacheprovider --timeout 100 -k "$KEXPR" \
    --ignore tests/test_compile.py tests 2>&1 | grep -v PytestBenchmarkWarning | grep -v "warner(" | tail -60
  echo "== [$(( $(date +%s) - START ))s] done"
} 2>&1 | tee "$LOG"
