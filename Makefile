# Qwen3.5 toolkit: one entry point for set-up, tests and the patched llama.cpp build.
#   make setup             venv + Python deps + pinned, patched llama.cpp (one CMake build) + bindings
#   make demo              setup, then checkpoint -> GGUF -> one chat reply through the bindings, timed
#   make serve             setup, then serve the demo checkpoint over the OpenAI API on 127.0.0.1:8000
#   make check             lint + format check (ruff) and the tests that need no native build (< 2 min)
#   make test              setup, then the whole test suite (GPU tests skip without a GPU)
#   make llama-upstream    the same llama.cpp unpatched, with llama-server, in its own build directory (A/B, peers)
#   make patches-export    rewrite cpp_patches/*.patch from the commits in build/src/vendor/llama.cpp
#   make cuda-check        compile the CUDA work with nvcc (no GPU needed; fetches cuBLAS headers if missing)
#   make clean             remove build/ and .venv (the next make starts from nothing)
# Variables: BACKEND=cpu|cuda|metal|vulkan (detected when empty), CUDA_ARCHS="86;89;90a;120",
#            JOBS (default: all cores), PYTHON (interpreter for the venv, default python3),
#            TEST_WORKERS (most pytest workers for `make test`, one per CPU; 0: no workers).

PYTHON  ?= python3
BACKEND ?= $(shell $(PYTHON) cpp_patches/tree.py backend)
CUDA_ARCHS ?=
JOBS    ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu)
VENV    := .venv
VPY     := $(VENV)/bin/python
TREE    := $(PYTHON) cpp_patches/tree.py
SRC     := build/src
BUILD   := build/$(BACKEND)
UP_SRC  := build/upstream-src
UP_BUILD:= build/upstream-$(BACKEND)

.PHONY: demo serve setup venv llama bindings check test upstream-lib llama-upstream patches-export cuda-deps cuda-check clean help
.DEFAULT_GOAL := help

help:
	@sed -n '2,/^$$/p' Makefile | sed -e '/^$$/d' -e 's/^# \{0,1\}//'

setup: venv llama bindings
	@$(VENV)/bin/qwen35 build-info

# Re-installs only when pyproject.toml changed.
$(VENV)/.stamp: pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -e ".[test]"
	@touch $@

venv: $(VENV)/.stamp

llama:
	@$(TREE) prepare $(SRC)
	@$(TREE) build $(SRC) $(BUILD) --backend $(BACKEND) --cuda-archs "$(CUDA_ARCHS)" --jobs $(JOBS)

bindings: venv llama
	@$(TREE) bindings $(SRC) $(BUILD) --python $(VPY)

llama-upstream:
	@$(TREE) prepare $(UP_SRC) --upstream
	@$(TREE) build $(UP_SRC) $(UP_BUILD) --upstream --backend $(BACKEND) --cuda-archs "$(CUDA_ARCHS)" --jobs $(JOBS) \
		--targets llama llama-quantize llama-imatrix llama-perplexity llama-bench llama-server mtmd --cmake-arg=-DLLAMA_BUILD_SERVER=ON

demo: setup
	$(VPY) examples/demo.py

DEMO_GGUF := build/demo/qwen35-dense-tiny-Q4_K_M.gguf
serve: setup
	@test -f $(DEMO_GGUF) || $(VENV)/bin/qwen35-convert examples/models/qwen35-dense-tiny -o $(DEMO_GGUF) --type Q4_K_M
	$(VENV)/bin/qwen35 serve $(DEMO_GGUF) --alias qwen35-demo

# The fast tier: what a change must pass before the long suite. No native build, no llama.cpp tree.
check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VPY) -m pytest -q -p no:xdist -m quick

# One pytest worker per logical CPU (at most TEST_WORKERS), whole files to a worker: a file's fixtures
# are built once. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 4
test: setup cuda-deps upstream-lib
	$(VPY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n logical --maxprocesses $(TEST_WORKERS) --dist loadfile) --durations=15

# The unpatched libllama the tests compare against (tests/test_native.py runs this target too, for
# pytest run alone), built here with every core: inside a pinned test worker it would get one.
# The tests only load it, so it is compiled without optimisation (1.8 min instead of 4.8 here);
# `make llama-upstream` builds the optimised one that benchmarks run.
upstream-lib:
	@$(TREE) prepare $(UP_SRC) --upstream
	@$(TREE) build $(UP_SRC) build/upstream-stock --upstream --backend cpu --targets llama --jobs $(JOBS) \
		--cmake-arg=-DCMAKE_BUILD_TYPE=None --cmake-arg=-DCMAKE_C_FLAGS=-O0 --cmake-arg=-DCMAKE_CXX_FLAGS=-O0

patches-export:
	@$(TREE) export $(SRC)

# With nvcc but no cuBLAS headers (a compiler-only CUDA install), the pinned ones from PyPI; else nothing.
cuda-deps:
	@$(PYTHON) cpp_patches/cuda/ggml_compile.py --fetch-only

cuda-check: venv cuda-deps
	@$(TREE) prepare $(SRC)
	$(VPY) -m pytest -q tests/test_cuda_compile.py

clean:
	rm -rf build $(VENV)
