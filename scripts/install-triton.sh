#!/usr/bin/env bash
# Install NVIDIA PyTriton (a real Triton Inference Server, CPU only) into a dedicated venv.
#
# Why: tests/real/test_triton_real.py drives the gateway's triton plugin against a real
# tritonserver (2.51, shipped inside the nvidia-pytriton wheel) serving small Python models
# from tests/real/triton_models.py. PyTriton pulls ~370 MB of dependencies that the gateway
# itself must never depend on, so it lives in its own venv, like llama.cpp's.
#
# The venv is made with the same interpreter as the tests (python3 on PATH, pyenv here):
# Triton's Python backend stub loads that interpreter's libpython through LD_LIBRARY_PATH,
# which the test fixture sets (see tests/real/triton_fixture.py).
#
# Idempotent: does nothing when the venv already imports the pinned version.
#
# Environment:
#   TRITON_VENV   venv path, relative to the repo root (default .venv-triton)
set -euo pipefail

PYTRITON_VERSION="0.7.0"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv="${TRITON_VENV:-.venv-triton}"
case "$venv" in
  /*) ;;
  *) venv="$repo_root/$venv" ;;
esac

log() { printf 'install-triton: %s\n' "$*" >&2; }

is_installed() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" - "$PYTRITON_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
from pathlib import Path

import pytriton
from pytriton.triton import Triton  # noqa: F401

server = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
sys.exit(0 if version("nvidia-pytriton") == sys.argv[1] and server.is_file() else 1)
EOF
}

if is_installed; then
  log "nvidia-pytriton ${PYTRITON_VERSION} already in $venv; nothing to do"
  exit 0
fi

# The embedded tritonserver needs glibc >= 2.35 (Debian 12 has 2.36).
glibc="$(ldd --version 2>/dev/null | head -n1 | grep -oE '[0-9]+\.[0-9]+$' || true)"
if [ -n "$glibc" ] && [ "$(printf '%s\n2.35\n' "$glibc" | sort -V | head -n1)" != "2.35" ]; then
  log "glibc $glibc is older than 2.35; the tritonserver in nvidia-pytriton will not run here"
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check --upgrade pip

log "installing nvidia-pytriton==${PYTRITON_VERSION} into $venv (~370 MB, pip caches the wheels)"
"$py" -m pip install --quiet --disable-pip-version-check "nvidia-pytriton==${PYTRITON_VERSION}"

if ! is_installed; then
  log "nvidia-pytriton is installed but 'from pytriton.triton import Triton' fails in $venv"
  exit 1
fi
log "ready: $py tests/real/triton_models.py"
