# The commands of the README. Each one creates the virtual environment .venv on first use
# (Python 3.11, 3.12 or 3.13; every package pinned, with its hashes, in requirements/*.lock) and
# reuses it afterwards.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
# The newest supported Python that runs (a pyenv shim of a version not selected does not), or PYTHON=.
PYTHON ?= $(firstword $(foreach v,3.13 3.12 3.11,$(shell python$(v) -c '' 2>/dev/null && command -v python$(v))))
export PATH := $(abspath $(BIN)):$(PATH)
# Every install: hashes required, and --no-deps, so the lock alone decides what is installed: pip
# resolves nothing, whatever newer releases the index holds (pip check then proves the set whole).
PIP_INSTALL := $(BIN)/python -m pip install --quiet --require-hashes --no-deps --no-build-isolation

.PHONY: help setup setup-gpu lock run lint check test test-pythons system-packages dashboards bench chaos

help:             ## this list
	@grep -E '^[a-z-]+: .*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):[^#]*## /\1\t/' | awk -F'\t' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## the virtual environment .venv with the locked packages (make setup PYTHON=python3.12 picks one)

# The runtime with TensorFlow's CUDA libraries (the extra `gpu`: NVIDIA's wheels, about 3 GB), for a
# machine with an NVIDIA GPU and its driver: gpu.lock is runtime.lock plus those packages.
setup-gpu: setup  ## setup plus TensorFlow's CUDA libraries, for a machine with an NVIDIA GPU
	$(PIP_INSTALL) -r requirements/gpu.lock

# The venv's bundled pip only installs the locked pip, setuptools and wheel (bootstrap.lock); that
# pip installs the rest. The project itself is installed without a download.
$(VENV)/.installed: requirements/bootstrap.lock requirements/runtime.lock requirements/test.lock pyproject.toml
	@PYTHON='$(PYTHON)' VENV='$(VENV)' bash requirements/check-python.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/bootstrap.lock
	$(PIP_INSTALL) -r requirements/runtime.lock -r requirements/test.lock
	$(BIN)/python -m pip check
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --no-index -e .
	touch $@

# uv resolves for every platform (--universal), keeps the pins already in the lock files unless
# ARGS=--upgrade (or --upgrade-package NAME), and writes each version's sha256 hashes.
UV := .uv/bin/uv
LOCK := --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet $(ARGS)

lock:             ## requirements/*.lock, with hashes, from pyproject.toml and requirements/bootstrap.in
	test -x $(UV) || ($(PYTHON) -m venv .uv && .uv/bin/pip install --quiet uv==0.13.9)
	$(UV) pip compile pyproject.toml $(LOCK) -o requirements/runtime.lock
	$(UV) pip compile --group pyproject.toml:test -c requirements/runtime.lock $(LOCK) -o requirements/test.lock
	$(UV) pip compile pyproject.toml --extra gpu -c requirements/runtime.lock $(LOCK) -o requirements/gpu.lock
	$(UV) pip compile requirements/bootstrap.in -c requirements/runtime.lock $(LOCK) -o requirements/bootstrap.lock

run: setup        ## the whole pipeline: dvc repro, every stage reporting to a Prefect server
	mnist run $(ARGS)

lint: setup       ## ruff check, ruff format --check and mypy (strict on pipeline/ and stages/), as configured in pyproject.toml
	ruff check
	ruff format --check
	mypy

# Two pytest processes (pytest-xdist): the suite waits on servers and subprocesses half of its time.
# TEST_PROCESSES=0 runs it in one process; tests/conftest.py groups the tests that share a fixture.
TEST_PROCESSES ?= 2

check: lint       ## lint, then the tests that need no server and no pipeline run (tiers: docs/testing.md)
	python -m pytest -n $(TEST_PROCESSES) --dist loadgroup --no-loadscope-reorder -m "not pipeline and not services" $(ARGS)

test: setup       ## the whole test suite; tests that need a missing Debian package skip, named at the end
	python -m pytest -n $(TEST_PROCESSES) --dist loadgroup --no-loadscope-reorder $(ARGS)

test-pythons: setup ## setup, the unit tests and a quick run on Python 3.11, 3.12 and 3.13, each in a clean clone of HEAD
	bash tests/pythons.sh $(ARGS)

system-packages:  ## (as root) the Debian packages some tests need: requirements/system-packages.txt
	bash requirements/system-packages.sh

dashboards: setup ## Prefect UI on 127.0.0.1:4200 and TensorBoard on 127.0.0.1:6006
	mnist dashboards $(ARGS)

bench: setup      ## benchmarks: prints a table, writes benchmarks/results.json
	python -m benchmarks $(ARGS)

chaos: setup      ## faults injected into quick runs, compared with a clean run: prints a table, writes benchmarks/chaos.json
	python -m benchmarks.chaos $(ARGS)
