# Headrace: the two commands a fresh machine needs are `make serve` and `make test`.
# Each creates .venv and installs what it needs on first use (stamps record what is in).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck unit toolchains bench-tools proto bench bench-quick clean fuzz soak

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml server/headrace/telemetry/_fastspans.c server/headrace/telemetry/_fastotlp.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# A real Triton for tests, bench and `headrace triton` (headrace/launchers/triton.py): the
# tritonserver binary and python backend inside the nvidia-pytriton wheel; only the binary is
# used, so the wheel's Python dependencies are left out. Its python-backend stub runs the models
# in the first python3 on PATH, and predates numpy 2 (with numpy 2 tensors come back empty), so
# the models get a venv of their own with numpy<2, apart from Headrace's numpy.
TRITON_WHEEL := nvidia-pytriton==0.7.0
TRITON_PYTHON := $(VENV)/triton-python

$(DEV_STAMP): pyproject.toml Makefile server/headrace/telemetry/_fastspans.c server/headrace/telemetry/_fastotlp.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(TRITON_WHEEL)
	$(BIN)/python -m venv --without-pip $(TRITON_PYTHON)
	$(BIN)/python -m pip --python $(TRITON_PYTHON)/bin/python install --quiet 'numpy<2'
	touch $@ $(RUNTIME_STAMP)

## serve: run the gateway on the embedded default config (ARGS="--port 0 --config FILE ...")
serve: $(RUNTIME_STAMP)
	$(BIN)/headrace serve $(ARGS)

## test: lint, type-check and run every test
test: lint typecheck unit

lint: $(DEV_STAMP)
	$(BIN)/ruff check server tests bench proto clients
	$(BIN)/ruff format --check server tests bench proto clients

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

# The client tests build clients/node and clients/cpp from proto/: their toolchains come from
# Debian's packages when missing (a no-op when present).
toolchains:
	clients/install-toolchains.sh

## bench-tools: h2load and nghttp (Debian's nghttp2-client) when missing: the `workers`
## scenario's load generator (bench/h2load.py), also used by its tests
bench-tools:
	bench/install-tools.sh

unit: $(DEV_STAMP) toolchains bench-tools
	$(BIN)/pytest $(PYTEST_ARGS)

## proto: regenerate server/headrace/protocol/*_pb2* from proto/
proto: $(DEV_STAMP)
	$(BIN)/python proto/generate_python.py server/headrace/protocol

## bench: the standard set of benchmark scenarios (~15 min on 2 cores; see bench/README.md),
## or one scenario with ARGS="frontend --trials 5"; JSON, Markdown and PNG go to bench/results/
bench: $(DEV_STAMP) bench-tools
	$(BIN)/python -m bench $(ARGS)

## bench-quick: the standard set with short windows, one trial, fewer load levels (~2 min)
bench-quick: $(DEV_STAMP) bench-tools
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache clients/node/node_modules clients/cpp/build

## fuzz: the front-end fuzz tests at full size (FUZZ_EXAMPLES per test, 8 tests)
FUZZ_EXAMPLES ?= 20000
fuzz: $(DEV_STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -p no:cacheprovider --timeout=0 tests/frontend/test_fuzz.py

## soak: steady load on one Headrace process for SOAK_SECONDS (default 30 min): RSS, errors
SOAK_SECONDS ?= 1800
soak: $(DEV_STAMP)
	$(BIN)/python -m bench soak --duration-s $(SOAK_SECONDS)
