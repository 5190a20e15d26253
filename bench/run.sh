#!/usr/bin/env bash
# Entry point for `make bench`: install the load tools if missing, make sure the
# project venv exists, then hand all arguments to bench/bench.py.
#   BENCH_PYTHON=...      interpreter for the harness and helper servers (default .venv/bin/python)
#   BENCH_GATEWAY_CMD=... command template standing in for the gateway (see bench/README.md)
#   BENCH_LITELLM=1       also benchmark LiteLLM proxy (installed into .venv-litellm)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)
command -v go >/dev/null || missing+=(golang-go)   # builds bench/loadgen.go (open loop, streaming)
if ((${#missing[@]})); then
    echo "run.sh: installing ${missing[*]}" >&2
    # keep Debian's postinst from starting a system nginx on port 80
    made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
fi

PY="${BENCH_PYTHON:-.venv/bin/python}"
if [[ -z "${BENCH_PYTHON:-}" && ! -x .venv/bin/python ]]; then
    make install
fi

if [[ "${BENCH_LITELLM:-0}" == 1 && ! -x .venv-litellm/bin/litellm ]]; then
    "${BENCH_LITELLM_BASE_PYTHON:-python3}" -m venv .venv-litellm
    .venv-litellm/bin/pip install -q 'litellm[proxy]'
fi

export BENCH_LAUNCHER="bash bench/run.sh"
exec "$PY" bench/bench.py "$@"
