# inference-server — `make run` serves, `make test` lints and runs every test tier (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
# Exact versions of every dependency (runtime, test, dev, plugins); `make lock` rewrites it.
LOCK := requirements/constraints.txt
# Core and plugins in ONE pip command: an unrelated 'inference-server' exists on PyPI.
REQUIREMENTS := -e '.[dev]' $(foreach p,$(PLUGINS),-e $(p))
# Reinstall whenever a pyproject or the lock changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(wildcard plugins/*/pyproject.toml) $(wildcard $(LOCK)) | cksum | cut -d' ' -f1)
# pip run by a test (tests/thirdparty builds a fresh venv) resolves against the lock too.
PIP_LOCKED := PIP_CONSTRAINT=$(CURDIR)/$(LOCK)
# `make test-latest`: the newest releases the pyproject ranges allow, no lock, own venv.
LATEST_VENV := .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python

.PHONY: install run test test-fast test-latest fuzz upstreams system-deps lint fmt lock check-config bench bench-instructions clean wheels container-deps
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(PY) -m pip install --disable-pip-version-check -q -c $(LOCK) $(REQUIREMENTS)
	touch $@

install: $(STAMP)

# Re-resolve every dependency to its newest allowed release (pip's resolver, nothing installed),
# then `make test` installs and tests exactly that. Commit the lock with the change that needs it.
lock:
	$(PYTHON) scripts/lock.py $(LOCK) $(REQUIREMENTS)

run: install
	$(PY) -m inference_server

check-config: install
	$(PY) -m inference_server --check-config

# The image's dependencies as wheels (the lock's exact versions, plus setuptools to build the
# project's own packages), so `docker build` installs them with no package index. Built by this
# venv's Python: the image's Python must have the same minor version (3.11). async-timeout: redis
# needs it below Python 3.11.3 (Debian bookworm's python3 is 3.11.2), which the lock, resolved
# on a newer 3.11, does not list.
wheels: install
	@tmp=$$(mktemp) && $(PY) scripts/runtime_requirements.py pyproject.toml \
	  $(addsuffix /pyproject.toml,$(PLUGINS)) > $$tmp && \
	$(PY) -m pip wheel --disable-pip-version-check -q -w wheels -c $(LOCK) -r $$tmp \
	  'setuptools>=68' 'async-timeout>=4.0.3'; rc=$$?; rm -f $$tmp; exit $$rc
	@ls wheels/*.whl | wc -l | xargs printf 'wheels/: %s wheels\n'

# Real upstream servers used by the test tiers (each in its own venv, built once, then cached).
upstreams:
	bash scripts/install-llama-server.sh
	bash scripts/install-triton.sh

# Debian packages the tests run for real: Prometheus (+ promtool) scrapes a live gateway; a
# redis-server per test run (on a free port) holds shared state; nginx balances gateway replicas
# (tests/process/test_replicas.py, the container tier) and checks the compose config (nginx -t).
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null \
	  && command -v redis-server >/dev/null \
	  && { command -v nginx >/dev/null || test -x /usr/sbin/nginx; } || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    prometheus redis-server nginx; }

# Lint first (seconds), then every tier, on the locked versions.
# The container tier (tests/container): podman, runc and debootstrap from Debian, the local base
# image (made once, cached) and the locked wheels. Where podman cannot work the tier skips loudly.
container-deps: wheels
	@bash scripts/container-base.sh >/dev/null || \
	  echo "WARNING: podman is not usable here: the container test tier will skip"

test: install lint upstreams system-deps container-deps
	$(PIP_LOCKED) $(PY) -m pytest

test-fast: install
	$(PIP_LOCKED) $(PY) -m pytest -m "not real"

# The differential tests (fast paths held equal to the libraries they stand in for) against the
# newest releases, in a venv of their own, to see a library change coming before `make lock`
# takes it. Not part of `make test`. pytest's exit 5 (nothing marked `differential`) is reported
# and passes; any other failure fails.
test-latest:
	test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install --disable-pip-version-check -q --upgrade --upgrade-strategy eager \
	  $(REQUIREMENTS)
	@$(LATEST_PY) scripts/lock.py --diff $(LOCK)
	$(LATEST_PY) -m pytest -m differential; rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  echo "test-latest: no test is marked 'differential'; nothing to compare (not a failure)"; \
	  exit 0; \
	fi; exit $$rc

# The fuzz tier at length (make test runs it with FUZZ_EXAMPLES=1000 per kind, < 60 s).
FUZZ_EXAMPLES ?= 20000
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/fuzz -p no:randomly

lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy inference_server plugins/*/src tests bench scripts

fmt: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	bash bench/run.sh

# Instructions per request under callgrind: exact cost ratios, immune to machine noise.
bench-instructions: install
	@command -v valgrind >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends valgrind; }
	$(PY) bench/instructions.py

clean:
	rm -rf build dist *.egg-info plugins/*/src/*.egg-info .mypy_cache .ruff_cache $(LATEST_VENV)
