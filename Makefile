# The README's commands. Each target creates the virtual environment it needs (.venv) and installs
# what is missing, so `make demo` and `make test` both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (0.9 GB). On a GPU machine: make TORCH=torch demo
TORCH ?= torch==2.13.0

.PHONY: demo test docs lint format bench clean-venv

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

$(VENV)/.docs: pyproject.toml $(VENV)/.core
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

demo: $(VENV)/.core
	$(BIN)/difflora demo

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# The documentation as a site in site/ (mkdocs.yml): strict, so a broken link, a broken anchor or a
# page missing from the nav fails the build.
docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

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
