"""A real ``redis-server`` (the Debian package ``make test`` installs) on a free loopback port.

Each :class:`RedisServer` is its own process with no persistence (``--save '' --appendonly
no``), so tests never share or leave state; it can be killed and started again on the same
port to test what the gateway does while Redis is away and after it returns.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.support.procs import free_port, log_tail

_READY_SECS = 10.0


class RedisServer:
    """One redis-server process; ``url`` stays the same across :meth:`stop` / :meth:`start`."""

    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make system-deps` installs it")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            args = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
            args += ["--appendonly", "no", "--protected-mode", "yes"]
            self.proc = subprocess.Popen(
                [self.binary, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + _READY_SECS
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n{log_tail(self.log_path)}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        """Kill it (SIGKILL: what a crash looks like to the gateway) and reap it."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
