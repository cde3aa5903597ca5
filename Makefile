# The two commands of the README: `make run` (install + full pipeline) and `make test` (install + tests).
# Installs into a virtual environment (.venv) that also sees the system's packages, so a CUDA build of
# PyTorch that is already installed is used as is. Where no torch is importable, the pinned CPU-compatible
# version is installed first, so pip never resolves `torch` to the newest (CUDA) build on its own.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export PATH := $(abspath $(BIN)):$(PATH)
# The compiled AdvCAM extension is cached outside the repo (DVC experiments run in temporary copies).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/advcam/torch_extensions

.PHONY: install run test clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	snakemake --cores all --rerun-incomplete

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf data models cams pseudo metrics plots logs .snakemake .advcam-work
