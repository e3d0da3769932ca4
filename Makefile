# Two commands do all set-up on a fresh machine (Python 3.11+, gcc, cmake):
#   make demo   the goDrive pipeline, end to end
#   make test   the test suite
# Set-up is offline except for the package registries: torch 2.13.0 (its CPU build where there is no
# NVIDIA GPU), llama-cpp-python built once from its source distribution and kept as a wheel in
# $(WHEELS), so a second `make` (or a fresh clone on the same machine) never rebuilds it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
LLAMA_CPP_VERSION := 0.3.36
WHEELS ?= $(HOME)/.cache/tunesmith/wheels
SDIST := $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
STAMP := $(VENV)/.tunesmith-installed
# llama.cpp's default build targets the build machine (-march=native). On Sapphire Rapids CPUs in VMs that
# turns on its AMX matmul path, which segfaults on the first batched decode (seen here; llama.cpp issue
# 20824). A portable AVX2 build avoids it and runs on any x86-64 machine of the last ten years.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export TUNESMITH_WHEELS := $(WHEELS)

.PHONY: demo test setup lint bench clean

demo: setup
	$(VENV)/bin/tunesmith pipeline --config examples/godrive/config.yaml

test: setup
	$(PY) -m pytest -q

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check tunesmith tests bench examples

$(STAMP): pyproject.toml Makefile
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
	$(PIP) install -q --find-links $(WHEELS) -e ".[test]"
	$(PY) -m tunesmith.export.llama_cpp install $(SDIST)
	@# Headless Chromium (Debian's, never a browser download) and a CJK font for the report and UI tests.
	command -v chromium >/dev/null && fc-list | grep -qi "wenquanyi\|noto sans cjk" || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-wqy-microhei) || echo "warning: could not install chromium (not root?): browser tests will be skipped"
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs
