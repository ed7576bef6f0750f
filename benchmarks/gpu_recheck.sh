#!/usr/bin/env bash
# A short GPU re-check after fixing what benchmarks/gpu_suite.sh showed: rebuild bertfast._C (CUDA), report which
# C++ runtime it links, rerun the exception probe and the tests named on the command line (pytest -k expression).
# About 3 minutes on the H200 (2026-11-26: build 92 s, probe 36 s, 282 tests 37 s). Exit status: the build's when
# it failed (nothing else runs then: the probe and tests would test the previous build), else 0 only when the
# probe and the tests passed.
#   benchmarks/gpu_recheck.sh OUTDIR "bad or linear_act"
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_recheck.sh OUTDIR KEXPR}; KEXPR=${2:?pytest -k expression}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"; LOG="$OUT/recheck.log"; : > "$LOG"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_CACHE_DIR="$PWD/.cache/triton" HF_HOME="$PWD/.cache/hf"
export BERTFAST_CUDA_ARCHS=${BERTFAST_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16}
START=$(date +%s)
log() { echo "$*" | tee -a "$LOG"; }
log "== toolchain: $(c++ --version | head -1)"
for f in libstdc++.so libstdc++.so.6 libstdc++.a; do log "  c++ -print-file-name=$f: $(c++ -print-file-name=$f)"; done
log "== [$(( $(date +%s) - START ))s] build"
timeout 240 env BERTFAST_FORCE_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -v -e . > "$OUT/build.txt" 2>&1
rc=$?
grep -E "bertfast:|rror|-shared" "$OUT/build.txt" | cut -c1-600 | tee -a "$LOG"
rm -f "$OUT/build.txt"
if [ $rc != 0 ]; then log "== build failed (exit $rc): nothing else run"; exit $rc; fi
log "== [$(( $(date +%s) - START ))s] exception probe"
timeout 90 $PY -m benchmarks.exception_probe --isolate > "$OUT/probe.txt" 2>&1
probe=$?
grep -v "^  round" "$OUT/probe.txt" | tee -a "$LOG"; rm -f "$OUT/probe.txt"
log "== [$(( $(date +%s) - START ))s] tests -k '$KEXPR'"
EXTRA=()
$PY -c "import xdist" 2>/dev/null && EXTRA+=(-n "${TEST_WORKERS:-12}")
$PY -c "import pytest_timeout" 2>/dev/null && EXTRA+=(--timeout 100)
timeout 150 env OMP_NUM_THREADS=1 BERTFAST_CHECK_LAUNCHES=1 $PY -m pytest -q -ra -p no:cacheprovider ${EXTRA[@]+"${EXTRA[@]}"} -k "$KEXPR" \
  --ignore tests/test_compile.py tests > "$OUT/tests.txt" 2>&1
tests=$?
grep -v -e PytestBenchmarkWarning -e "warner(" "$OUT/tests.txt" | tail -60 | tee -a "$LOG"; rm -f "$OUT/tests.txt"
log "== [$(( $(date +%s) - START ))s] done: probe exit $probe, tests exit $tests"
[ $probe = 0 ] && [ $tests = 0 ]
