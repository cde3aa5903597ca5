# The two commands of the README: `make run` (install + full pipeline) and `make test` (install + tests).
# Installs into a virtual environment (.venv) that also sees the system's packages, so a CUDA build of
# PyTorch that is already installed is used as is. Where no torch is importable, the pinned CPU-compatible
# version is installed first, so pip never resolves `torch` to the newest (CUDA) build on its own.
# Every other package is installed at the version in constraints.txt (the set CI tests; `make lock` renews it),
# so a new release of a dependency cannot change a fresh install; `make install CONSTRAINTS=` resolves
# setup.py's ranges instead.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# The oldest Python and torch advcam runs on (setup.py's python_requires and torch range): Snakemake 9 needs
# Python 3.11; older torch builds break on NumPy 2, which constraints.txt pins.
PYTHON_MIN := 3.11
TORCH_MIN := 2.3
CONSTRAINTS ?= constraints.txt
export PATH := $(abspath $(BIN)):$(PATH)
# The compiled AdvCAM extension is cached outside the repo (DVC experiments run in temporary copies).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/advcam/torch_extensions

.PHONY: install run test clean lock

$(BIN)/python:
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$(PYTHON_MIN)'.split('.'))))" || { echo \
	  "make: advcam needs Python >= $(PYTHON_MIN) (Snakemake 9 does); $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
	  "Name a newer one: make PYTHON=python$(PYTHON_MIN)" >&2; exit 1; }
	$(PYTHON) -m venv --system-site-packages $(VENV)

# pydensecrf2 (the dense CRF; 1.1 is its only release) comes as a source archive whose build pins Cython 0.29, and
# the C++ that Cython 0.29 writes does not compile against Python 3.13's headers. From 3.13 on it is built first
# with Cython 3 instead (the same CRF: its output matched the 3.11 build's exactly on a random 3-class input).
# The checks below use `sys.exit(condition)`, which fails (exit 1) when the condition holds: the torch check
# succeeds, and torch is installed into .venv, only when the torch there is older than TORCH_MIN.
$(VENV)/.installed: setup.py $(CONSTRAINTS) | $(BIN)/python
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; \
	elif $(BIN)/python -c "import sys, torch; sys.exit(torch.__version__ >= '$(TORCH_MIN)')" 2>/dev/null; then \
	  echo "make: the torch that .venv sees is older than $(TORCH_MIN) (NumPy 2 needs $(TORCH_MIN) or newer):" \
	    "installing torch==$(TORCH_VERSION) into .venv (a torch outside .venv stays as it is)"; \
	  $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"; fi
	if $(BIN)/python -c "import sys; sys.exit(sys.version_info < (3, 13))" && \
	    ! $(BIN)/python -c "import pydensecrf.densecrf" 2>/dev/null; then \
	  $(BIN)/python -m pip install "cython>=3,<4" setuptools wheel && \
	  $(BIN)/python -m pip install --no-build-isolation "pydensecrf2==1.1"; fi
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	snakemake --cores all --rerun-incomplete

# One pytest worker per CPU (pytest-xdist); each test file runs whole on one worker, so its module fixtures (a
# tiny Snakemake or DVC run) are made once. The files go to the workers in the order tests/conftest.py collects
# them, the longest first (--no-loadscope-reorder: xdist would otherwise start the files with the most tests first,
# which left the longest, test_workflow.py, to run alone at the end).
test: install
	$(BIN)/python -m pytest -q -n logical --dist loadfile --no-loadscope-reorder tests

# Renews constraints.txt: the newest versions within setup.py's ranges, resolved in a venv of its own (no system
# packages), for this Python. torch and the packages only torch needs are left out, so that a CUDA build of
# torch that a user has keeps its own. Run `make test` (and `make run`) on the result before committing it.
LOCK_VENV := .lock-venv
LOCK_FILE := $(or $(CONSTRAINTS),constraints.txt)
# Not pinned (grep -E, matched against `name==`): torch and the packages only torch needs, and pip's own.
# tests/test_packaging.py reads this line.
LOCK_EXCLUDE := ^(torch|sympy|mpmath|triton|nvidia-.*-cu[0-9]+|pip|setuptools|wheel)==
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install "torch==$(TORCH_VERSION)"
	$(LOCK_VENV)/bin/python -m pip install -e ".[test]"
	{ echo "# The versions CI tests (make lock, $$(date +%F); $$($(LOCK_VENV)/bin/python -V), $$(uname -sm))."; \
	  echo "# make install applies them for this Python; other Pythons resolve setup.py's ranges."; \
	  echo "# torch and the packages only torch needs (sympy, mpmath, triton, nvidia-*-cu*) are not pinned here."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
	  | grep -viE '$(LOCK_EXCLUDE)' \
	  | sed "s/\$$/ ; python_version == \"$$($(LOCK_VENV)/bin/python -c 'import sys; print(*sys.version_info[:2], sep=".")')\"/"; \
	} > $(LOCK_FILE).new && mv $(LOCK_FILE).new $(LOCK_FILE)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf data models cams pseudo metrics plots logs .snakemake .advcam-work
