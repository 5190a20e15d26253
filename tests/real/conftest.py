"""Fixtures that run a real llama.cpp OpenAI-compatible server for the whole session.

Why: mocks only prove the gateway agrees with our own idea of the OpenAI API; a real
llama.cpp server (``llama_cpp.server`` from llama-cpp-python) proves it against an
upstream we did not write. The server runs from a dedicated venv made by
``scripts/install-llama-server.sh`` (default ``<repo>/.venv-llama``, overridable by the
``LLAMA_VENV`` environment variable) and serves a tiny random-weight model written
at session start, so nothing is downloaded.

A missing venv is a test *failure*, never a skip: CI must install it, and a silently
skipped upstream suite would hide exactly the regressions it exists to catch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.real.triton_fixture import TritonServer, triton_server
from tests.support.procs import free_port, running_process
from tests.support.tiny_gguf import write_tiny_llama_gguf

# Registered here, once for the whole directory: one PyTriton server per machine at a time.
__all__ = ["LlamaServer", "TritonServer", "llama_server", "triton_server"]

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = "scripts/install-llama-server.sh"
MODEL_ALIAS = "tiny"
#: Generous: the tiny model loads in < 1 s, but importing the server stack on a busy
#: 2-core CI machine can take several seconds.
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class LlamaServer:
    """A running llama.cpp server: OpenAI base URL (ending in /v1) and model alias."""

    base_url: str
    model: str


def llama_venv() -> Path:
    """Return the llama-cpp-python venv: $LLAMA_VENV (relative to the repo) or .venv-llama."""
    configured = os.environ.get("LLAMA_VENV", "").strip()
    venv = Path(configured) if configured else Path(".venv-llama")
    return venv if venv.is_absolute() else REPO_ROOT / venv


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """Start ``python -m llama_cpp.server`` on a free 127.0.0.1 port with the tiny model."""
    python = llama_venv() / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{python} is missing: run `bash {INSTALL_SCRIPT}` (about 7 minutes the first "
            "time) to build llama-cpp-python; the real-upstream tests never skip.",
            pytrace=False,
        )

    workdir = tmp_path_factory.mktemp("llama")
    model_path = workdir / "tiny.gguf"
    write_tiny_llama_gguf(model_path)
    port = free_port()
    cmd = [
        str(python),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "512",
        # By default a new request aborts the one in flight (a stream then just ends
        # with [DONE] and no finish_reason); queue them instead, like a real upstream.
        "--interrupt_requests",
        "False",
        # /v1/embeddings too (the GGUF has a mean pooling type: one 64-float vector per input).
        "--embedding",
        "true",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base_url = f"http://127.0.0.1:{port}/v1"
    started = time.monotonic()
    with running_process(
        cmd,
        env=env,
        ready_url=f"{base_url}/models",
        timeout=START_TIMEOUT,
        log_path=workdir / "llama-server.log",
    ):
        print(f"llama server ready at {base_url} in {time.monotonic() - started:.1f} s")
        yield LlamaServer(base_url=base_url, model=MODEL_ALIAS)
