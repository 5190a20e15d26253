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
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

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


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except FileNotFoundError:
        return []


def _socket_inodes(local_port: int, remote_port: int) -> set[str]:
    """Inodes of loopback TCP sockets from ``local_port`` to ``remote_port`` (/proc/net/tcp*)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (
                int(local.rsplit(":", 1)[1], 16) == local_port
                and int(remote.rsplit(":", 1)[1], 16) == remote_port
            ):
                inodes.add(inode)
    return inodes


def connection_owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of the connection from ``client_port``.

    With ``--workers`` the kernel hands each connection to one worker (SO_REUSEPORT); this
    tells a test which one, so it can assert that every worker answered or kill the one
    serving a given request.  None if no process in ``pids`` holds it (yet).
    """
    inodes = {f"socket:[{i}]" for i in _socket_inodes(server_port, client_port)}
    if not inodes:
        return None
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except (FileNotFoundError, PermissionError):
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    return None


def wait_for_lines(
    log_path: Path, predicate: Callable[[str], bool], count: int, timeout: float
) -> list[str]:
    """The first ``count`` lines of ``log_path`` matching ``predicate``, polled for ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            lines = [line for line in log_path.read_text().splitlines() if predicate(line)]
        except FileNotFoundError:
            lines = []
        if len(lines) >= count:
            return lines[:count]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"{count} matching line(s) not logged within {timeout} s; log ends with:\n"
                f"{log_tail(log_path)}"
            )
        time.sleep(_POLL_INTERVAL)


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path,
    config: Mapping[str, Any],
    *args: str,
    env: Mapping[str, str] | None = None,
    sections: Mapping[str, Any] | None = None,
    prefix: tuple[str, ...] = (),
    port: int | None = None,
    ready_path: str = "/",
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``python -m inference_server`` on ``port`` (default: a free one) with ``config`` as its
    settings.yaml ``default`` section (plus ``sections``), ready once ``GET ready_path`` answers
    200.

    The process gets our environment without INFERENCE_*, OTEL_*, PROMETHEUS_* and RUN_ENV (a
    developer's shell must not change what a test runs), plus ``env``.  ``prefix`` wraps the
    command (e.g. ``sh -c 'ulimit -n 128 && exec "$0" "$@"'``).
    """
    port = port or free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = tmp_path / "settings.yaml"
    settings.write_text(json.dumps({"default": config, **(sections or {})}))
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INFERENCE_", "OTEL_", "PROMETHEUS_")) and k != "RUN_ENV"
    }
    cmd = [*prefix, sys.executable, "-m", "inference_server", "--config", str(settings)]
    with running_process(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), *args],
        env={**base_env, **(env or {})},
        ready_url=f"http://127.0.0.1:{port}{ready_path}",
        timeout=30,
        log_path=tmp_path / "server.log",
    ) as proc:
        yield proc, port
