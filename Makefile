# inference-server — `make run` serves, `make test` runs every test tier (what CI runs).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(wildcard plugins/*/pyproject.toml) | cksum | cut -d' ' -f1)

.PHONY: install run test test-fast fuzz upstreams system-deps lint fmt check-config bench clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	# Core and plugins in ONE pip command: an unrelated 'inference-server' exists on PyPI.
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]' $(foreach p,$(PLUGINS),-e $(p))
	touch $@

install: $(STAMP)

run: install
	$(PY) -m inference_server

check-config: install
	$(PY) -m inference_server --check-config

# Real upstream servers used by the test tiers (each in its own venv, built once, then cached).
upstreams:
	bash scripts/install-llama-server.sh
	bash scripts/install-triton.sh

# Debian packages the tests run for real: Prometheus (+ promtool) scrapes a live gateway.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

test: install upstreams system-deps
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real"

# The fuzz tier at length (make test runs it with FUZZ_EXAMPLES=1000 per kind, < 60 s).
FUZZ_EXAMPLES ?= 20000
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest tests/fuzz -p no:randomly

lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy inference_server plugins/*/src tests bench

fmt: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	bash bench/run.sh

clean:
	rm -rf build dist *.egg-info plugins/*/src/*.egg-info .mypy_cache .ruff_cache
