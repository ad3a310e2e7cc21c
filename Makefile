# The two commands the README starts with:
#   make run    set up a virtualenv and run the daemon on config/mailrouter.example.toml
#   make test   set up a virtualenv (with the test servers where possible) and run
#               ruff, mypy and the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/mailrouter.example.toml

.PHONY: run test lint venv dev-venv servers bench clean

$(BIN)/mailrouter: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.dev: pyproject.toml $(BIN)/mailrouter
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/mailrouter
dev-venv: $(VENV)/.dev

run: venv
	$(BIN)/mailrouter -c $(CONFIG) run

servers:
	@VENV=$(VENV) scripts/test-servers

lint: dev-venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: dev-venv servers lint
	$(BIN)/pytest

bench: dev-venv
	$(BIN)/python bench/replay_bench.py

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
