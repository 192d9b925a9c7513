# One command to set up and run the main job, one to set up and run the tests.
# Both are idempotent: the virtual environment is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned by constraints.txt: 2.13.0 is the CPU wheel on these machines (see README).
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	# hf: Hugging Face / Flower Datasets, so their tests run too (offline, on local files).
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,hf]"
	touch $(STAMP)

demo: setup
	$(BIN)/fedkd simulate scenarios/parking_cams.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not ray"

clean:
	rm -rf $(VENV) results/*/
