# Set up a machine with `make install`, then `make train` (the quickstart) or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint train

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'

# pytest exits 5 when it collects no tests (an empty selection): report it, do not fail on it
test:
	$(BIN)/python -m pytest -q --durations=10; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint:
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

train:
	$(BIN)/maelab train +experiment=quickstart
