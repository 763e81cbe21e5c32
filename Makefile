# vod-sr: `make demo` runs the DAG end to end on the local AWS emulator; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Airflow state for demo and bench (tests use a fresh temporary one per session).
export AIRFLOW_HOME ?= $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export PYTHONPATH := $(CURDIR)

.PHONY: install browser demo test test-fast bench lint format lock emulator screenshots clean

install: $(BIN)/.installed

$(BIN)/.installed: requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "vod-sr needs Python 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $@

# The browser tests drive Debian's Chromium (no browser downloads are possible here): install it when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || { echo "Installing Debian's chromium for the browser tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/python -m scripts.demo

test: install browser
	$(BIN)/python -m pytest

test-fast: install  ## unit and DAG tests only, no emulator runs
	$(BIN)/python -m pytest -m "not e2e and not fullstack"

screenshots: install browser  ## docs/trigger-form.png, taken by the browser test from the real form
	$(BIN)/python -m pytest -q tests/e2e/test_trigger_form_browser.py -k form_opens
	mkdir -p docs && cp test-artifacts/trigger-form.png docs/trigger-form.png

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
	rm -rf $(VENV) .airflow .demo .pytest_cache .ruff_cache test-artifacts
