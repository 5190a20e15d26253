"""Start and stop real service processes (e.g. a llama.cpp server) for tests.

Why this exists: tests against real upstreams need a process that is reliably ready
before the first request and reliably gone afterwards, even when a test fails or the
process spawns children. Each process therefore gets its own process group (so the
whole group can be signalled), logs to a file (so a failed start shows *why*), and
is polled on an HTTP readiness URL with a bounded loop (so a hung start fails the
run instead of hanging CI). Services listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

_POLL_INTERVAL = 0.1
_PROBE_TIMEOUT = 2.0
_STOP_TIMEOUT = 10.0
_LOG_TAIL_BYTES = 4000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The OS picks it (bind to port 0); there is a small race until the service binds
    it, which is acceptable for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(log_path: Path, limit: int = _LOG_TAIL_BYTES) -> str:
    """Return the last ``limit`` bytes of a log file as text ('' if it is missing)."""
    try:
        with log_path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            size = log.tell()
            log.seek(max(0, size - limit))
            return log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _is_ready(url: str) -> bool:
    """Return True if ``url`` answers HTTP 200 right now."""
    try:
        with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT) as response:
            status: int = response.status
            response.read()
            return status == 200
    except urllib.error.HTTPError as error:
        error.close()
        return False
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, wait up to 10 s, then SIGKILL it and reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_STOP_TIMEOUT)
    # Children left in the group (if any) are killed even when the leader exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def running_process(
    cmd: list[str],
    *,
    env: dict[str, str] | None,
    ready_url: str,
    timeout: float,
    log_path: Path,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` until the ``with`` block ends, yielding once ``ready_url`` is 200.

    ``env`` replaces the environment when given (``None`` inherits ours). stdout and
    stderr both go to ``log_path``. Raises RuntimeError, with the log tail, if the
    process exits before it is ready or is not ready within ``timeout`` seconds.
    On exit the whole process group gets SIGTERM, then SIGKILL after 10 s.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{cmd[0]} exited with code {code} before {ready_url} was ready; "
                    f"log {log_path} ends with:\n{log_tail(log_path)}"
                )
            if _is_ready(ready_url):
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"{cmd[0]} was not ready at {ready_url} within {timeout:.0f} s; "
                    f"log {log_path} ends with:\n{log_tail(log_path)}"
                )
            time.sleep(_POLL_INTERVAL)
        yield proc
    finally:
        _stop_group(proc)
