# The two commands a newcomer needs: `make train` and `make test`. Everything else is optional.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT  ?= python3
VENV         ?= .venv
PY           := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DATA_DIR     ?= data/stdlib
CONFIG       ?= configs/tiny_cpu.json
ARGS         ?=

# One process per GPU; on a CPU box two ranks exercise DDP without oversubscribing small machines.
NPROC ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); if [ "$$n" -gt 0 ] 2>/dev/null; then echo $$n; else echo 2; fi)

# PyPI's Linux torch wheel is the CUDA build: take it where an NVIDIA GPU is present, and the
# CPU build from PyTorch's CPU index elsewhere (several GB smaller). macOS wheels are CPU/MPS.
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA),yes)
  TORCH_INDEX :=
else ifeq ($(shell uname -s),Linux)
  TORCH_INDEX := --extra-index-url https://download.pytorch.org/whl/cpu
else
  TORCH_INDEX :=
endif

.PHONY: help setup data train test lint bench gpu-check tensorboard checkpoints resume clean-venv

help:
	@echo "make train        set up, prepare the default data, train the tiny model with torchrun"
	@echo "make test         run the linter and the test suite"
	@echo "make setup        create $(VENV) with torch $(TORCH_VERSION) ($(if $(HAS_NVIDIA),CUDA,CPU) build) and the project"
	@echo "make data         prepare the embedded stdlib corpus into $(DATA_DIR)"
	@echo "make bench        the trainer against a bare loop, side by side, into docs/BENCHMARKS.md (ARGS=--quick)"
	@echo "make gpu-check    on a lent GPU (under 8 min): bf16+compile and FP8 runs, stop/resume, report in logs/gpu_check"
	@echo "make tensorboard  start TensorBoard on logs/ and print the SSH tunnel line"
	@echo "make checkpoints  list checkpoints with step, val loss and validity"
	@echo "make resume       resume the last run (ARGS='--max_steps 2000' to pass flags)"

# Stamp file: setup reruns only when the dependency list changes.
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' else 1)" 2>/dev/null \
	  || $(PY) -m pip install --retries 1 --timeout 30 "torch==$(TORCH_VERSION)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev,hf,tokenizers]"
	@touch $@

data: setup
	@test -f $(DATA_DIR)/meta.json && $(PY) -c "import json,sys; m=json.load(open('$(DATA_DIR)/meta.json')); sys.exit(0 if m.get('complete') else 1)" \
	  || $(PY) src/prepare_data.py --dataset stdlib --out $(DATA_DIR)

train: data
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) src/train_improved.py --config $(CONFIG) --data_dir $(DATA_DIR) --resume auto $(ARGS)
	@echo
	@echo "Next:"
	@echo "  make tensorboard                    the curves in your browser (also over ssh: it prints the tunnel line)"
	@echo "  make checkpoints                    the checkpoints with their step, val loss and validity"
	@echo "  ls logs/plots/                      the same curves as PNG charts"
	@echo "  make train ARGS='--max_steps 300'   train this run further"
	@echo "  make test                           the test suite"

# Two workers, a test file each: most multi-process tests spend part of their time waiting (signals,
# timeouts, start-up), so two files at once finish the suite in about three quarters of the time on
# 2 cores. Files are handed out in the order tests/conftest.py collects them (longest first, so both
# workers end together), not xdist's (most tests first). PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= 2
test: setup lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check src tests bench

bench: setup
	$(PY) bench/run_bench.py $(ARGS)

gpu-check: setup
	$(PY) bench/gpu_check.py $(ARGS)

tensorboard: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" bash shell/start_tensorboard.sh $(ARGS)

checkpoints:
	bash shell/list_checkpoints.sh $(ARGS)

resume: setup
	NPROC=$(NPROC) PATH="$(abspath $(VENV))/bin:$$PATH" bash shell/resume_training.sh $(ARGS)

clean-venv:
	rm -rf $(VENV)
