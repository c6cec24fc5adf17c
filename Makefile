# The README's commands. Each target creates the virtual environment it needs (.venv) and installs
# what is missing, so `make demo` and `make test` both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (0.9 GB). On a GPU machine: make TORCH=torch demo
TORCH ?= torch==2.13.0

.PHONY: demo test lint format bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.core
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.core
	$(BIN)/difflora demo

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.test
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_train.py

clean-venv:
	rm -rf $(VENV)
