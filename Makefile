# The commands of the README. Each one creates the virtual environment .venv on first use
# (Python 3.11, every package pinned, with its hashes, in requirements/*.lock) and reuses it afterwards.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTHON ?= $(shell command -v python3.11 || command -v python3)
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup setup-gpu lock run test dashboards bench chaos

setup: $(VENV)/.installed

# The runtime with TensorFlow's CUDA libraries (the extra `gpu`: NVIDIA's wheels, about 3 GB), for a
# machine with an NVIDIA GPU and its driver: gpu.lock is runtime.lock plus those packages.
setup-gpu: setup
	$(BIN)/pip install --quiet --require-hashes -r requirements/gpu.lock

# pip checks every download against the lock's sha256 hashes; the project itself is installed
# without a download (no build isolation: the locked setuptools builds it).
$(VENV)/.installed: requirements/runtime.lock requirements/test.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements/runtime.lock -r requirements/test.lock
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# uv resolves for every platform (--universal), keeps the pins already in the lock files unless
# ARGS=--upgrade (or --upgrade-package NAME), and writes each version's sha256 hashes.
UV := .uv/bin/uv
LOCK := --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet $(ARGS)

lock:             ## requirements/runtime.lock, test.lock and gpu.lock, with hashes, from pyproject.toml
	test -x $(UV) || ($(PYTHON) -m venv .uv && .uv/bin/pip install --quiet uv==0.13.9)
	$(UV) pip compile pyproject.toml $(LOCK) -o requirements/runtime.lock
	$(UV) pip compile --group pyproject.toml:test -c requirements/runtime.lock $(LOCK) -o requirements/test.lock
	$(UV) pip compile pyproject.toml --extra gpu -c requirements/runtime.lock $(LOCK) -o requirements/gpu.lock

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
