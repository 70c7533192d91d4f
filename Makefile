# Headrace: the two commands a fresh machine needs are `make serve` and `make test`.
# Each creates .venv and installs what it needs on first use (stamps record what is in).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck unit proto bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
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

unit: $(DEV_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## proto: regenerate server/headrace/protocol/*_pb2* from proto/
proto: $(DEV_STAMP)
	$(BIN)/python proto/generate_python.py server/headrace/protocol

## bench: the benchmark scenarios (see bench/README.md); results go to bench/results/
bench: $(DEV_STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
