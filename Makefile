# The two commands of the README. Both work on a fresh machine with only Python 3.11 and Java.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean-venv

$(BIN)/vlpipe: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## make run: set up .venv and run the whole pipeline on the embedded default (shapes world)
run: $(BIN)/vlpipe
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

## make test: set up .venv if needed and run the test suite
test: $(BIN)/vlpipe
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: $(BIN)/vlpipe
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
