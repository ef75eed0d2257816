# Every target creates the virtual environment first, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help venv serve test lint typecheck check bench clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

venv: $(STAMP)  ## create .venv with authhook and the dev tools

serve: $(STAMP)  ## run the PDP on the embedded SQLite store with the demo world loaded
	$(BIN)/authhook --store sqlite:///./authhook-demo.db import examples/demo-world.yaml
	$(BIN)/authhook --store sqlite:///./authhook-demo.db serve

test: $(STAMP)  ## run the whole test suite
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check authhook tests bench
	$(BIN)/ruff format --check authhook tests bench

typecheck: $(STAMP)  ## mypy strict on authhook/
	$(BIN)/mypy

check: lint typecheck test  ## everything CI runs

bench: $(STAMP)  ## in-process decision benchmark
	$(BIN)/python bench/decision_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache authhook-demo.db*
