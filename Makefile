# tritonconv: a torch.compile backend that runs 2D convolutions on Triton kernels.
#
#   make demo    compile a torchvision ResNet-18 with the backend, compare with eager, print the report
#                (on the GPU if one is visible, else on CPU through Triton's interpreter)
#   make test    the test suite: the CPU tests through Triton's interpreter, then, when a CUDA GPU
#                is visible, the cuda-marked tests on the GPU (make test-cpu / test-cuda: one half)
#   make bench   the GPU benchmark (bench/conv_bench.py); results go to bench/results/
#   make bench-models  torchvision models: eager, torch.compile and tritonconv (bench/model_bench.py)
#   make clean   remove the virtualenv, build files and caches
#
# Each target first creates ./.venv (if missing) and installs into it, once, what it needs:
# $(DEPS) and this package (pip install -e .). A stamp file records the install, so later
# runs install nothing until setup.cfg, setup.py or pyproject.toml change.
#
# Variables (make VAR=value ...):
#   PYTHON       interpreter that creates the virtualenv (default python3)
#   VENV         where the virtualenv lives (default .venv)
#   DEPS         what pip installs besides the package
#   NO_VENV=1    no virtualenv and no downloads: use $(PYTHON) as it is (it must already have
#                torch, triton, torchvision and pytest) and install only the package into it, with
#                pip install --no-deps --no-build-isolation -e . -- for machines without internet
#   PYTEST_ARGS  extra pytest arguments, e.g. PYTEST_ARGS="-x -k options"
#   DEMO_ARGS    arguments for examples/resnet.py, e.g. DEMO_ARGS="--arch resnet50"
#   BENCH_ARGS   arguments for bench/conv_bench.py (make bench) or bench/model_bench.py (make bench-models),
#                e.g. BENCH_ARGS="--models resnet18,mobilenet_v2 --configs fp32-b32"

PYTHON ?= python3
VENV ?= .venv
DEPS ?= torch==2.14.1 torchvision==0.29.1 pytest
NO_VENV ?= 0
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=

ifeq ($(NO_VENV),1)
PY := $(PYTHON)
STAMP := build/.installed-$(subst /,_,$(PYTHON))
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tritonconv-installed
endif

# Exit status 0 when torch in $(PY) sees a CUDA GPU.
HAS_CUDA = $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.PHONY: help install demo test test-cpu test-cuda bench bench-models clean

help:
	@sed -n '3,10s/^# \{0,1\}//p' Makefile

install: $(STAMP)

ifeq ($(NO_VENV),1)
$(STAMP): setup.cfg setup.py pyproject.toml
	$(PY) -c "import torch, triton, torchvision, pytest" || \
	  { echo "NO_VENV=1: $(PYTHON) needs torch, triton, torchvision and pytest installed"; exit 1; }
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	@mkdir -p $(dir $@) && touch $@
else
$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg setup.py pyproject.toml | $(PY)
	$(PY) -m pip install $(DEPS)
	$(PY) -m pip install -e .
	@touch $@
endif

demo: $(STAMP)
	@if $(HAS_CUDA); then \
	  echo "== make demo: CUDA GPU visible, running examples/resnet.py on the GPU"; \
	  env -u TRITON_INTERPRET $(PY) examples/resnet.py $(DEMO_ARGS); \
	else \
	  echo "== make demo: no CUDA GPU visible, running examples/resnet.py on CPU through Triton's interpreter"; \
	  TRITON_INTERPRET=1 $(PY) examples/resnet.py --device cpu $(DEMO_ARGS); \
	fi

# The CPU suite: Triton kernels on CPU tensors through the interpreter (set before anything imports triton).
define run_cpu_tests
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not cuda" $(PYTEST_ARGS)
endef

# The GPU suite, only where torch sees a CUDA GPU, and never under the interpreter.
define run_cuda_tests
	@if $(HAS_CUDA); then \
	  echo "== CUDA GPU visible: running the cuda-marked tests"; \
	  echo "env -u TRITON_INTERPRET $(PY) -m pytest -m cuda $(PYTEST_ARGS)"; \
	  env -u TRITON_INTERPRET $(PY) -m pytest -m cuda $(PYTEST_ARGS); \
	else \
	  echo "== no CUDA GPU visible: the cuda-marked tests did not run (run make test on a GPU machine)"; \
	fi
endef

test: $(STAMP)
	$(run_cpu_tests)
	$(run_cuda_tests)

test-cpu: $(STAMP)
	$(run_cpu_tests)

test-cuda: $(STAMP)
	$(run_cuda_tests)

bench: $(STAMP)
	env -u TRITON_INTERPRET $(PY) bench/conv_bench.py $(BENCH_ARGS)

bench-models: $(STAMP)
	env -u TRITON_INTERPRET $(PY) bench/model_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
