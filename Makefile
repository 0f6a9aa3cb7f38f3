# The commands of the README: `make demo` (the main job), `make test` (lint, then the whole suite:
# what CI runs) and `make test-fast` (while editing: the suite without the tests marked slow, the
# multi-process, end-to-end and benchmark runs; under a minute on 2 cores).
# Each creates .venv/ on first use and installs torch==2.13.0 before anything that depends on it:
# that release is the CPU wheel on our machines, while an unpinned torch pulls a multi-GB CUDA build.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test test-fast lint bench bench-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[full,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bigbatch train

# The benchmarks, tables and plots into benchmarks/results/: `make bench` the quick scripts,
# `make bench-all` the long ones too (activation checkpointing, torchrun elastic runs, checkpoint cost, threads, compile).
bench: $(STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[full,bench]'
	$(PYTHON) benchmarks/run_all.py

bench-all: $(STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[full,bench]'
	$(PYTHON) benchmarks/run_all.py --all

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# 2 xdist workers; tests/conftest.py gives each one torch thread (OMP_NUM_THREADS=1, inherited by
# the processes the tests start), so they do not oversubscribe 2 cores.
test: lint
	$(PYTHON) -m pytest -n 2 -q

test-fast: $(STAMP)
	$(PYTHON) -m pytest -n 2 -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
