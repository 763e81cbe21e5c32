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

.PHONY: install browser services demo test test-fast test-e2e test-stack bench lint format lock emulator screenshots clean

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

# The full-stack tests run Airflow on PostgreSQL with Celery on Redis: install the servers when missing (the tests
# start throwaway instances of their own; nothing is configured system-wide).
services:
	@{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } && command -v redis-server >/dev/null || { \
	  echo "Installing Debian's postgresql and redis-server for the full-stack tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server >/dev/null; }

# Test tiers (README, Tests): each a marker expression and how it runs.
# - fast: unit, DAG, emulator-over-HTTP, FastAPI-route and bench tests; no Airflow processes.
# - e2e: the DAG through dag.test() on the emulator; each xdist worker with its own Airflow home and emulator
#   (tests/conftest.py), a module's tests on one worker (--dist loadscope) so module fixtures start once.
#   More xdist workers than cores: part of their tests wait (the emulator's paced model runs, real-time clips,
#   polls), and the extra workers keep the cores busy meanwhile. Measured on 2 cores: e2e 521 s with -n 3, 466 s
#   with -n 4; fast 183 s with -n 2, 135 s with -n 3.
# - stack: real Airflow stacks (Celery, PostgreSQL, Redis, Chromium); two at a time (--dist loadgroup: the tests on
#   the shared stack are one group, so one worker starts it; each other module is a group of its own).
#   The tests that kill a triggerer or a worker run here too, each on a stack of its own: what they time is set by
#   Airflow's heartbeat timeouts, not by the load.
FAST_TESTS := -m "not e2e and not fullstack and not services" -n 3 --dist load
E2E_TESTS := -m "e2e and not fullstack and not services" -n 4 --dist loadscope
STACK_TESTS := -m "fullstack or services" -n 2 --dist loadgroup
DURATIONS := test-artifacts/durations

# Every process a test starts carries the run's tag; anything still running with it afterwards fails the target.
# Each tier writes its tests' durations; test-artifacts/durations.txt merges them (slowest 30 first).
define run_tiers
	@tag="make-test-$$$$"; status=0; rm -rf $(DURATIONS); \
	for tier in $(1); do \
	  case $$tier in fast) args='$(FAST_TESTS)';; e2e) args='$(E2E_TESTS)';; stack) args='$(STACK_TESTS)';; esac; \
	  echo "=== make test: tier $$tier ($$args)"; \
	  eval VOD_SR_PROCESS_TAG="$$tag" VOD_SR_DURATIONS_FILE=$(DURATIONS)/$$tier.tsv \
	    $(BIN)/python -m pytest $$args $(PYTEST_ARGS) || status=1; \
	done; \
	$(BIN)/python -m scripts.durations $(DURATIONS) test-artifacts/durations.txt || true; \
	$(BIN)/python -m scripts.leftover_processes "$$tag" || status=1; \
	exit $$status
endef

test: install browser services  ## every tier (21 minutes on 2 cores, measured); PYTEST_ARGS=... passes options on
	$(call run_tiers,fast e2e stack)

test-fast: install  ## unit and DAG tests, no Airflow processes (under 3 min on 2 cores, measured)
	$(call run_tiers,fast)

test-e2e: install  ## the DAG through dag.test() on the emulator
	$(call run_tiers,e2e)

test-stack: install browser services  ## real Airflow stacks (Celery, PostgreSQL, Redis, Chromium)
	$(call run_tiers,stack)

screenshots: install browser services  ## docs/trigger-form.png and docs/run-tab.png, taken by the browser tests
	$(BIN)/python -m pytest -q tests/e2e/test_trigger_form_browser.py -k "form_opens or the_tab_follows_the_run"
	mkdir -p docs && cp test-artifacts/trigger-form.png docs/trigger-form.png && cp test-artifacts/run-tab.png docs/run-tab.png

# ONLY=plan_1m[,parse...] runs some steps (merged into bench-results.json); SLOT_CHUNK_SIZE=n sets the chunk size of
# the streams and 4-GPU runs (default 1); every process the bench starts carries
# its tag, and anything still running with it afterwards fails the target, as in `make test`.
bench: install services
	@tag="make-bench-$$$$"; status=0; \
	VOD_SR_PROCESS_TAG="$$tag" $(BIN)/python -m scripts.bench $(if $(ONLY),--only $(ONLY)) \
	  $(if $(SLOT_CHUNK_SIZE),--slot-chunk-size $(SLOT_CHUNK_SIZE)) || status=$$?; \
	$(BIN)/python -m scripts.leftover_processes "$$tag" || status=1; \
	exit $$status

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

# .env for docker compose (never committed): .env.example with fresh secrets and your uid. LOCAL=1 points it at the
# compose `local` profile's AWS emulator and turns that profile on; FORCE=1 replaces an existing file; ENV_FILE=path
# writes elsewhere. Needs only python3 (LOCAL=1: Python 3.11, it reads include/local_aws).
ENV_FILE ?= .env
define MAKE_ENV_PY
import base64, os, secrets, sys
from pathlib import Path

target = Path(os.environ['ENV_FILE'])
if target.exists() and os.environ.get('FORCE') != '1':
    sys.exit(f'make env: {target} exists; FORCE=1 replaces it with new secrets (then the database volume still has '
             'the old password: `docker compose down -v` deletes it)')
values = {
    'AIRFLOW__CORE__FERNET_KEY': base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),  # = Fernet.generate_key()
    'AIRFLOW__API_AUTH__JWT_SECRET': secrets.token_urlsafe(32),
    'AIRFLOW__API__SECRET_KEY': secrets.token_urlsafe(32),
    'POSTGRES_PASSWORD': secrets.token_urlsafe(24),
    '_AIRFLOW_WWW_USER_PASSWORD': secrets.token_urlsafe(18),
    'AIRFLOW_UID': str(os.getuid()),
}
if os.environ.get('LOCAL') == '1':
    from include.local_aws.world import airflow_env

    # The id the seeded emulator gives its instance (docker-compose.yaml, aws-emulator-seed, checks it).
    values.update(airflow_env('http://aws-emulator:5055', 'i-3d2dcf99df1f33a23', poll_interval=5))
    values['COMPOSE_PROFILES'] = 'local'


def line(key, value):
    return f"{key}='{value}'" if any(c in value for c in ' "#{') else f'{key}={value}'


lines = []
for text in Path('.env.example').read_text().splitlines():
    key = text.split('=', 1)[0]
    lines.append(line(key, values.pop(key)) if '=' in text and key in values else text)
if values:
    lines += ['', '# --- make env LOCAL=1: the local AWS emulator (compose profile local) ---']
    lines += [line(key, value) for key, value in values.items()]
descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.fchmod(descriptor, 0o600)
with os.fdopen(descriptor, 'w') as file:
    file.write('\n'.join(lines) + '\n')
print(f'make env: wrote {target}' + ('' if os.environ.get('LOCAL') == '1' else '; now set the VOD_SR_* values in it'))
endef
export MAKE_ENV_PY

.PHONY: env
env:  ## .env for docker compose, with fresh secrets (LOCAL=1: the local AWS emulator; FORCE=1: replace)
	@ENV_FILE="$(ENV_FILE)" FORCE="$(FORCE)" LOCAL="$(LOCAL)" $(PYTHON) -c "$$MAKE_ENV_PY"

clean:
	rm -rf $(VENV) .airflow .demo .pytest_cache .ruff_cache test-artifacts
