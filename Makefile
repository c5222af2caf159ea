# The commands of the README. Each one creates the virtual environment .venv on first use
# (Python 3.11, every package pinned in requirements.lock) and reuses it afterwards.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test dashboards bench chaos flow serve

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

run: setup        ## the whole pipeline: dvc repro, every stage reporting to a Prefect server
	mnist run $(ARGS)

test: setup       ## the whole test suite (needs Debian's chromium for the browser tests)
	python -m pytest $(ARGS)

dashboards: setup ## Prefect UI on 127.0.0.1:4200 and TensorBoard on 127.0.0.1:6006
	mnist dashboards $(ARGS)

bench: setup      ## benchmarks: prints a table, writes benchmarks/results.json
	python -m benchmarks $(ARGS)

chaos: setup      ## faults injected into quick runs, compared with a clean run: prints a table, writes benchmarks/chaos.json
	python -m benchmarks.chaos $(ARGS)
