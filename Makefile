# The two set-up commands: `make run` (pipeline on the offline default) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export DVC_NO_ANALYTICS ?= 1

.PHONY: run federated test sweep install install-test clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## make run: create the venv, install, run the whole pipeline (dvc repro) and print the result table.
run: $(VENV)/.installed
	$(BIN)/dvc repro
	@cat metrics/report.md

## make federated: the federated pipeline (pipelines/federated/dvc.yaml: federated rounds, the centralised upper
## bound, their evaluations and the four-way report); DVC first brings the root stages it reads up to date.
federated: $(VENV)/.installed
	$(BIN)/dvc repro pipelines/federated/dvc.yaml
	@cat metrics/federated/report.md

## make test: install the test requirements and run the test suite, two test files at a time (pytest-xdist; loadfile
## keeps each file's module fixtures, such as the end-to-end pipeline, on one worker), the 25 slowest listed.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

## make sweep: the seed's ten presets plus the other strategies, as queued DVC experiments, then one comparison.
sweep: $(VENV)/.installed
	$(BIN)/python scripts/sweep.py

clean-venv:
	rm -rf $(VENV)
