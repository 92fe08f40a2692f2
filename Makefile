# The two commands of the README: `make bench` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test files run in parallel processes (pytest-xdist), each file whole in one process so that its
# module fixtures are built once; tests/conftest.py shares the cores out among them. Much of the
# suite is single-threaded (interpreted kernels, subprocesses starting Python) or waits on a
# clock. `make test PYTEST_PARALLEL=` runs it in one process.
PYTEST_PARALLEL ?= -n auto --maxprocesses 4 --dist loadfile
BENCH_OUT ?= bench/results/cpu

.PHONY: install test test-compat bench lint format clean

install: $(STAMP)

# torch and torchvision are installed first and pinned, so pip never picks a newer torch.
$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c .ci/constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The GPU machine runs torch 2.11, torchvision 0.26 and Triton 3.6 (.ci/compat.txt); this venv
# has torch 2.14. test-compat runs the suite again (less the `slow` checks) with those unpacked in
# front of the venv's packages, so code that needs a newer torch or Triton fails on the CPU too.
# Triton 3.6's interpreter needs numpy<2.4 (see kernels/gate.py), unpacked apart so that a test can
# also run the GPU stack with the venv's newer NumPy. From PyPI with --no-deps (torch 2.11: a
# 530 MB download, 1.2 GB unpacked): torch 2.11 loads the CUDA libraries the venv's torch brought
# (both are CUDA 13 builds) and shares its other dependencies. Reinstalled only when
# .ci/compat.txt changes (the venv itself is an order-only prerequisite).
COMPAT := $(VENV)/compat
COMPAT_STAMP := $(COMPAT)/.installed
COMPAT_SITE := $(abspath $(COMPAT)/gpu-stack)
COMPAT_PATH := $(COMPAT_SITE):$(abspath $(COMPAT)/numpy)

$(COMPAT_STAMP): .ci/compat.txt | $(STAMP)
	rm -rf $(COMPAT)
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT)/gpu-stack -r .ci/compat.txt
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT)/numpy 'numpy<2.4'
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	SCCONV_COMPAT_SITE=$(COMPAT_SITE) PYTHONPATH=$(COMPAT_PATH) \
	$(BIN)/python -c 'import torch, torchvision, triton, numpy; print("test-compat: torch", \
	    torch.__version__, "torchvision", torchvision.__version__, "triton", triton.__version__, \
	    "numpy", numpy.__version__)'
	SCCONV_COMPAT_SITE=$(COMPAT_SITE) PYTHONPATH=$(COMPAT_PATH) \
	$(BIN)/python -m pytest -m "not slow" -p no:cacheprovider $(PYTEST_PARALLEL) \
	    -W "ignore:Conversion of an array with ndim:DeprecationWarning" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench --out $(BENCH_OUT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
