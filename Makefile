# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
# Both create .venv if missing, install torch==2.13.0 FIRST (so pip never resolves an unpinned,
# multi-GB CUDA torch), then lmforge with its extras.
# On a GPU machine with a CUDA torch already installed system-wide:
#   make test VENV_ARGS=--system-site-packages TORCH=
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: install demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@if [ -n "$(TORCH)" ]; then $(PIP) install "$(TORCH)"; fi
	$(PIP) install -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lmforge quickstart

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: install
	$(PY) -m pytest -m slow

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) benchmarks/bench_prepare.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_quality.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
