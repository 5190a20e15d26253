"""A real Triton Inference Server (PyTriton) for the whole test session.

Why: the triton plugin's unit tests answer with our own idea of Triton; this fixture runs
tritonserver 2.51 from ``nvidia-pytriton`` (CPU only) with the small deterministic models of
``tests/real/triton_models.py``, so the plugin is proven against the server's real metadata,
readiness codes, ``/generate`` and ``/generate_stream`` behaviour.

- The server runs from a dedicated venv made by ``scripts/install-triton.sh`` (default
  ``<repo>/.venv-triton``, overridable by ``TRITON_VENV``).  A missing venv is a test *failure*,
  never a skip: a silently skipped upstream suite would hide the regressions it exists to catch.
- Triton's Python backend stub loads ``libpython`` dynamically; under pyenv it would pick up the
  system's and die with ``'_thread.RLock' object has no attribute '_recursion_count'``, so
  ``LD_LIBRARY_PATH`` starts with the venv interpreter's ``LIBDIR``.
- PyTriton supports one server per machine at a time, hence one per session; HTTP, gRPC and
  metrics ports are all free ports on 127.0.0.1.  It takes about 15-25 s to become ready here.

Import it into a test module (``from tests.real.triton_fixture import triton_server  # noqa: F401``)
or register it in tests/real/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.procs import free_port, log_tail, running_process

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = "scripts/install-triton.sh"
MODELS_SCRIPT = Path(__file__).with_name("triton_models.py")
#: Every model triton_models.py serves; ``fail_stream`` is bound last.
MODELS = ("echo", "spare", "echo_stream", "echo_cumulative", "embed", "fail_stream")
#: Ready in ~15-25 s on 2 idle cores; generous for a busy CI machine.
START_TIMEOUT = 180.0


@dataclass(frozen=True)
class TritonServer:
    """A running Triton: its HTTP base URL and the token of its restricted endpoints."""

    base_url: str
    #: ``triton-access-token`` for the model-repository API (used to unload a model).
    access_token: str
    #: Seconds from process start to every model ready.
    startup_secs: float


def triton_venv() -> Path:
    """The PyTriton venv: $TRITON_VENV (relative to the repo) or .venv-triton."""
    configured = os.environ.get("TRITON_VENV", "").strip()
    venv = Path(configured) if configured else Path(".venv-triton")
    return venv if venv.is_absolute() else REPO_ROOT / venv


def _libdir(python: Path) -> str:
    """The interpreter's LIBDIR (where its libpython lives), asked of that interpreter."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _all_ready(base_url: str) -> bool:
    for model in MODELS:
        try:
            with urllib.request.urlopen(f"{base_url}/v2/models/{model}/ready", timeout=2) as resp:
                if resp.status != 200:
                    return False
        except urllib.error.HTTPError as error:
            error.close()
            return False
        except (urllib.error.URLError, OSError):
            return False
    return True


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """Start ``triton_models.py`` under .venv-triton and wait until every model is ready."""
    python = triton_venv() / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"{python} is missing: run `bash {INSTALL_SCRIPT}` (about a minute; downloads "
            "nvidia-pytriton) to install Triton; the real-upstream tests never skip.",
            pytrace=False,
        )
    workdir = tmp_path_factory.mktemp("triton")
    http_port, grpc_port, metrics_port = _distinct_ports(3)
    token_file = workdir / "access-token"
    log_path = workdir / "triton.log"
    libdir = _libdir(python)
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LD_LIBRARY_PATH": f"{libdir}:{inherited}" if inherited else libdir,
    }
    cmd = [
        str(python),
        str(MODELS_SCRIPT),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--token-file",
        str(token_file),
        "--workspace",
        str(workdir / "workspace"),
    ]
    base_url = f"http://127.0.0.1:{http_port}"
    started = time.monotonic()
    with running_process(
        cmd,
        env=env,
        ready_url=f"{base_url}/v2/models/{MODELS[-1]}/ready",
        timeout=START_TIMEOUT,
        log_path=log_path,
    ) as proc:
        deadline = started + START_TIMEOUT
        while not _all_ready(base_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"Triton models {', '.join(MODELS)} not all ready; log {log_path} ends "
                    f"with:\n{log_tail(log_path)}",
                    pytrace=False,
                )
            time.sleep(0.2)
        startup = time.monotonic() - started
        sys.stderr.write(f"\ntriton ready at {base_url} in {startup:.1f} s\n")
        yield TritonServer(
            base_url=base_url,
            access_token=token_file.read_text().strip(),
            startup_secs=startup,
        )
