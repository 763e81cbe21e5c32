# vod-sr: `make demo` runs the DAG end to end on the local AWS emulator; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Airflow state for demo and bench (tests use a fresh temporary one per session).
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export PYTHONPATH := $(CURDIR)

.PHONY: install demo test test-fast bench lint format lock emulator clean

install: $(BIN)/.installed

$(BIN)/.installed: requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "vod-sr needs Python 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $@

demo: install
	$(BIN)/python -m scripts.demo

test: install
	$(BIN)/python -m pytest

test-fast: install  ## unit and DAG tests only, no emulator runs
	$(BIN)/python -m pytest -m "not e2e and not fullstack"

bench: install
	$(BIN)/python -m scripts.bench

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

emulator: install  ## the local AWS emulator in the foreground
	$(BIN)/python -m include.local_aws

lock: install  ## re-resolve constraints.txt after changing requirements*.txt
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements.txt -r requirements-dev.txt
	(echo "# The full resolved set for Python 3.11, installed with: pip install -r requirements.txt -r requirements-dev.txt -c constraints.txt"; \
	 echo "# Regenerate with: make lock"; .lock-venv/bin/pip freeze) > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .airflow .demo .pytest_cache .ruff_cache
