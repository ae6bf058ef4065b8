# Every set-up step lives here: `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The fused generator kernels (C++, XLA FFI; metanet_jax/kernels/build.py): rebuilt when a
# source changes. A failed build stops make: the kernels are never silently skipped.
KERNEL_DIR := metanet_jax/kernels
KERNELS    := $(KERNEL_DIR)/_metanet_kernels.so
KERNEL_SRC := $(wildcard $(KERNEL_DIR)/csrc/*.cc $(KERNEL_DIR)/csrc/*.h) $(KERNEL_DIR)/build.py \
              $(KERNEL_DIR)/_paths.py

# Offline data sets (read-only) and a writable data/cache folder.
SHARED_DATASETS := $(abspath ../shared/datasets)
ifneq ($(wildcard $(SHARED_DATASETS)/omniglot),)
export METANET_DATASETS ?= $(SHARED_DATASETS)
endif
export METANET_DATA_DIR ?= $(HOME)/.cache/metanet_jax/data
# JAX's persistent compilation cache: recompiles of the same programs are skipped.
export JAX_COMPILATION_CACHE_DIR ?= $(HOME)/.cache/metanet_jax/jax_cache
export TF_CPP_MIN_LOG_LEVEL ?= 2
# glibc's malloc with transparent huge pages for XLA's per-step buffers (experiments/common.py,
# MALLOC_TUNABLES; the programs restart themselves with it when it is unset).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install kernels test demo bench lint format clean

install: $(STAMP) $(KERNELS)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# Two pytest workers (most tests wait on single-threaded XLA compiles), a test file's tests on
# one worker (module fixtures and compiled-function caches stay shared; the data sets are
# prepared under an inter-process lock). PYTEST_WORKERS=0 runs them in this process.
PYTEST_WORKERS ?= 2

# The library records the digest of its sources (a rebuild with nothing changed only touches it).
$(KERNELS): $(KERNEL_SRC) $(STAMP)
	$(BIN)/python -m metanet_jax.kernels.build
	@touch $@

kernels: $(KERNELS)

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests

demo: install
	$(BIN)/python -m experiments.omniglot --flagfile=experiments/flags/demo.flags

bench: install
	$(BIN)/python benchmarks/episode_throughput.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info $(KERNELS)
