# The two commands of the README: `make bench` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
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
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The GPU machine runs Triton 3.6 (with torch 2.11); this venv has the Triton that torch 2.14
# pins. test-compat runs the tests of the Triton code again with Triton 3.6 unpacked in front of
# the venv's, through 3.6's interpreter, which needs numpy<2.4 (see kernels/gate.py). Both come
# from PyPI; torch stays the venv's.
COMPAT := $(VENV)/compat
COMPAT_STAMP := $(COMPAT)/.installed
COMPAT_TRITON := triton==3.6.0

$(COMPAT_STAMP): $(STAMP) Makefile
	rm -rf $(COMPAT)
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT)/triton '$(COMPAT_TRITON)'
	$(BIN)/python -m pip install -q --no-deps --target $(COMPAT)/numpy 'numpy<2.4'
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	SCCONV_COMPAT_TRITON=$(abspath $(COMPAT)/triton) \
	PYTHONPATH=$(abspath $(COMPAT)/triton):$(abspath $(COMPAT)/numpy) \
	$(BIN)/python -m pytest tests/test_kernels.py tests/test_gate_models.py tests/test_inference.py \
	    -p no:cacheprovider \
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
