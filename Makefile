# `make run` starts the service in local mode; `make test` runs every test.
# Both create the virtualenv and install the pinned requirements first.
# Another interpreter: `make test PYTHON=python3.13` (its own virtualenv, .venv-python3.13).
PYTHON ?= python3
VENV ?= $(if $(filter python3,$(PYTHON)),.venv,.venv-$(notdir $(PYTHON)))
PORT ?= 5000
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test install clean

install: $(VENV)/.installed tests/kql/node_modules/.installed tests/js/node_modules/.installed system-packages

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-otel.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

tests/kql/node_modules/.installed: tests/kql/package.json tests/kql/package-lock.json
	npm ci --prefix tests/kql --no-audit --no-fund
	touch $@

tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund
	touch $@

# Debian packages the tests drive for real, installed when missing (as root, like CI): headless
# Chromium and its driver (browser tests), nginx and redis-server (tests/test_production.py).
# Elsewhere the browser tests skip and say why; the production test fails naming what is missing.
SYSTEM_PACKAGES := chromium:chromium chromedriver:chromium-driver nginx:nginx redis-server:redis-server
.PHONY: system-packages
system-packages:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v "$${pair%%:*}" >/dev/null || [ -x "/usr/sbin/$${pair%%:*}" ] || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (apt-get install$$missing)"; fi; \
	fi

# /usage.js serves static/usage.min.js: static/usage.js minified by terser (tests/js pins its version;
# test_browser.py checks that the committed file is terser's output of the source).
.PHONY: usage-js
usage-js:
	@test -x tests/js/node_modules/.bin/terser || { echo "terser is missing: run make install"; exit 1; }
	tests/js/node_modules/.bin/terser static/usage.js --compress --mangle --output static/usage.min.js

run: $(VENV)/.installed
	@PORT='$(PORT)' $(BIN)/python config.py PORT
	$(BIN)/flask --app app run --host 127.0.0.1 --port $(PORT)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf .venv .venv-* bench/.venv-* tests/kql/node_modules tests/js/node_modules .pytest_cache

# `make bench`: bench/run.py -- POST /event side by side (bare Flask, this service local / Azure / Azure with
# a hanging ingestion, the Azure Monitor OpenTelemetry Distro, OpenCensus) under gunicorn + wrk on 127.0.0.1,
# 3 interleaved rounds, then the local store's throughput and the dashboard at scale; about 12 minutes.
# wrk comes from Debian's packages (installed when missing); the distro and OpenCensus scenarios build
# their own virtualenvs (bench/.venv-*). Writes bench/RESULTS.md and bench/results.json (not committed).
# `make bench BENCH_ARGS=--quick` is a one-minute smoke run of the harness (not reference figures).
BENCH_ARGS ?=
.PHONY: bench
bench: $(VENV)/.installed $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)

$(VENV)/.bench-installed: bench/requirements.txt $(VENV)/.installed
	$(BIN)/python -m pip install -q -r bench/requirements.txt
	touch $@
