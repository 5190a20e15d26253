#!/usr/bin/env bash
# Install llama-cpp-python's OpenAI-compatible server into a dedicated venv.
#
# Why: tests/real runs a real llama.cpp upstream (python -m llama_cpp.server). PyPI
# has no prebuilt Linux wheel, so llama.cpp is compiled from source (~7 min on
# 2 cores). The build is portable (GGML_NATIVE=OFF) and its wheel is kept in a
# dedicated cache folder keyed by version and flags, so later installs (e.g. CI's
# fresh clone on the same machine) take seconds. pip's own wheel cache is not used
# for the build because its key ignores CMAKE_ARGS and could hand back a wheel that
# was built with other flags.
#
# Idempotent: does nothing when the venv already imports the pinned version.
#
# Environment:
#   LLAMA_VENV       venv path, relative to the repo root (default .venv-llama)
#   LLAMA_WHEEL_DIR  where the built wheel is kept
#                    (default ${XDG_CACHE_HOME:-~/.cache}/inference-server/llama-wheels)
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="0.3.36"
BUILD_FLAVOUR="portable"   # change together with CMAKE_ARGS below

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="${LLAMA_VENV:-.venv-llama}"
case "$venv" in
  /*) ;;
  *) venv="$repo_root/$venv" ;;
esac
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/inference-server/llama-wheels"
wheel_dir="${LLAMA_WHEEL_DIR:-$cache_root}/${LLAMA_CPP_PYTHON_VERSION}-${BUILD_FLAVOUR}"

log() { printf 'install-llama-server: %s\n' "$*" >&2; }

is_installed() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$LLAMA_CPP_PYTHON_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version

import llama_cpp.server  # noqa: F401  (also loads the compiled libllama)

sys.exit(0 if version("llama-cpp-python") == sys.argv[1] else 1)
EOF
}

if is_installed; then
  log "llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION} already in $venv; nothing to do"
  exit 0
fi

# Build tools: llama.cpp needs a C and a C++ compiler, make and cmake >= 3.14.
missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v make >/dev/null 2>&1 || missing+=(make)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing missing build tools with apt-get: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip

if ! compgen -G "$wheel_dir/llama_cpp_python-${LLAMA_CPP_PYTHON_VERSION}-*.whl" >/dev/null; then
  log "building llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION} (about 7 minutes on 2 cores)"
  mkdir -p "$wheel_dir"
  build_start=$SECONDS
  CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$py" -m pip wheel --no-cache-dir --no-deps --wheel-dir "$wheel_dir" \
    "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"
  log "built in $((SECONDS - build_start)) s into $wheel_dir"
fi

log "installing llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION} into $venv"
"$py" -m pip install --quiet --find-links "$wheel_dir" \
  --only-binary llama-cpp-python \
  "llama-cpp-python[server]==${LLAMA_CPP_PYTHON_VERSION}"

if ! is_installed; then
  log "llama-cpp-python is installed but 'import llama_cpp.server' fails in $venv"
  exit 1
fi
log "ready: $py -m llama_cpp.server"
