"""``--workers N``: the parent process keeps N workers alive on one port.

A worker that dies is logged, its multiprocess metric files are marked dead (its in-flight and
breaker gauges leave the merged ``/metrics``) and it is replaced.  A worker that dies before it
listens, or soon after, is a start-up failure: the replacement waits
``server.worker_restart_backoff_secs``, doubling per consecutive failure (at most 30 s), and
after ``server.worker_max_boot_failures`` in a row the server stops with exit code 1 and says
why.  A worker that cannot start at all (exit code 3: busy port, bad address) stops the server at
once.  SIGHUP (hot reload, issue 16) re-reads and validates the settings in the parent (so a
worker started later gets them; invalid ones are logged and kept out) and goes to every
worker, each of which reloads itself.  SIGTERM/SIGINT go to every worker; the parent waits for them (at most the shutdown
timeout plus a grace, then SIGKILL) and exits 0 when they stopped cleanly.  A worker whose
supervisor is gone (killed with SIGKILL) notices within a second and stops by itself
(``server.serve(parent_pid=...)``), so no orphan keeps the port.

The parent never starts threads (forking a process that has threads can deadlock the child), so
it does not use the workers' batched log sink: its few lines are written directly, in the
configured format, to stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import orjson

from inference_server import metrics
from inference_server.settings import Settings

#: A worker's exit code when it cannot start at all (restarting it would fail the same way).
EXIT_CANNOT_START = 3
#: A worker that dies within this many seconds of becoming ready still counts as failing to start.
STABLE_SECS = 10.0
#: The longest wait before restarting a failing worker.
MAX_BACKOFF_SECS = 30.0
#: After forwarding SIGTERM, how much longer than ``shutdown_timeout_secs`` workers may take.
STOP_GRACE_SECS = 5.0

#: Re-reads the settings (a hot reload): the same sources and validation as start-up.
Loader = Callable[[], Settings]
#: Runs one worker in the child: (settings, on_ready, loader) → exit code.
WorkerMain = Callable[[Settings, Callable[[], None], Loader | None], int]


class ParentLog:
    """One line per event on stdout, shaped like the workers' lines (pretty or JSON)."""

    def __init__(self, fmt: str, level: str) -> None:
        self.json = fmt == "json"
        self.quiet = level in ("error", "critical")

    def __call__(self, level: str, message: str, **fields: Any) -> None:
        if self.quiet and level not in ("ERROR", "CRITICAL"):
            return
        now = datetime.datetime.now().astimezone()
        if self.json:
            line = orjson.dumps(
                {
                    "time": now.isoformat(),
                    "level": level.lower(),
                    "message": message,
                    "request_id": "-",
                    "trace_id": "-",
                    "span_id": "-",
                    "logger": "inference_server.supervisor",
                    **fields,
                }
            ).decode()
        else:
            line = f"{now:%Y-%m-%d %H:%M:%S}.{now.microsecond // 1000:03d} | {level:<8} | - | {message}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


@dataclass
class Worker:
    proc: BaseProcess
    ready_conn: Connection
    started: float
    ready_at: float | None = None
    #: The supervisor's reload count when this worker was forked (its settings' version).
    version: int = 0

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid


def describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}"


class Supervisor:
    """The parent's loop: start, watch, restart, stop."""

    def __init__(
        self, settings: Settings, worker_main: WorkerMain, loader: Loader | None = None
    ) -> None:
        self.settings = settings
        self.worker_main = worker_main
        self.loader = loader
        self.hangup = False
        #: SIGHUPs handled: a worker forked before the latest one reloads once it is ready.
        self.version = 0
        self.ctx = multiprocessing.get_context("fork")
        self.log = ParentLog(settings.logging.format, settings.logging.level)
        self.workers: list[Worker] = []
        self.pending: list[float] = []  # monotonic times at which a replacement is due
        self.boot_failures = 0
        self.stop_signal: int | None = None
        self.fatal: str | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # --- the worker side -------------------------------------------------------------------

    def _child(self, conn: Connection) -> None:
        """In the forked worker: forget the parent's signal plumbing, run, exit with its code."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop handles it
        self._wake_r.close()
        self._wake_w.close()

        def ready() -> None:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"ready")
                conn.close()

        sys.exit(self.worker_main(self.settings, ready, self.loader))

    # --- the parent side -------------------------------------------------------------------

    def _spawn(self) -> None:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=self._child, args=(writer,), daemon=False)
        proc.start()
        writer.close()
        self.workers.append(Worker(proc, reader, time.monotonic(), version=self.version))

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.hangup = True
        elif self.stop_signal is None:
            self.stop_signal = signum

    def _reload(self) -> None:
        """SIGHUP: validate the settings here (workers started from now on get them; the
        listening socket and the worker count stay as started), then every worker reloads."""
        self.hangup = False
        if self.loader is not None:
            from inference_server.settings import ConfigError

            try:
                fresh = self.loader()
            except ConfigError as exc:
                for problem in exc.problems:
                    self.log("ERROR", f"reload rejected, settings kept: {problem}")
            else:
                self.settings = dataclasses.replace(fresh, server=self.settings.server)
        self.version += 1
        self.log("INFO", f"SIGHUP: reloading {len(self.workers)} workers", event="reload")
        for worker in self.workers:
            if worker.ready_at is not None:  # a starting one ignores SIGHUP: see _mark_ready
                self._hangup(worker)

    def _hangup(self, worker: Worker) -> None:
        worker.version = self.version
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGHUP)

    def _reap(self, worker: Worker) -> None:
        """A worker died: clean its metrics, log it, and schedule (or refuse) a replacement."""
        self.workers.remove(worker)
        worker.ready_conn.close()
        metrics.worker_exit(worker.pid)
        code = worker.proc.exitcode
        how = describe_exit(code)
        if self.stop_signal is not None:
            return
        if code == EXIT_CANNOT_START:
            self.fatal = f"worker {worker.pid} cannot start ({how}; see its error above)"
            return
        now = time.monotonic()
        early = worker.ready_at is None or now - worker.ready_at < STABLE_SECS
        if early:
            self.boot_failures += 1
            if self.boot_failures >= self.settings.server.worker_max_boot_failures:
                self.fatal = (
                    f"workers died at start-up {self.boot_failures} times in a row "
                    f"(last: worker {worker.pid} {how})"
                )
                return
            base = self.settings.server.worker_restart_backoff_secs
            delay = min(MAX_BACKOFF_SECS, base * 2 ** (self.boot_failures - 1))
        else:
            self.boot_failures = 0
            delay = 0.0
        phase = "during start-up" if worker.ready_at is None else "after it started"
        self.log(
            "WARNING",
            f"worker {worker.pid} {how} {phase}; restarting it in {delay:g} s",
            event="worker_died",
            pid=worker.pid,
            exit_code=code,
        )
        self.pending.append(now + delay)

    def _mark_ready(self, worker: Worker) -> None:
        try:
            worker.ready_conn.recv_bytes()
        except (EOFError, OSError):  # it died before it listened: _reap sees it
            worker.ready_conn.close()
            return
        worker.ready_conn.close()
        worker.ready_at = time.monotonic()
        self.log("INFO", f"worker {worker.pid} is serving", event="worker_ready", pid=worker.pid)
        if worker.version < self.version:  # forked before a SIGHUP it could not handle yet
            self._hangup(worker)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT or a fatal start-up failure; the exit code."""
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.getsignal(sig) for sig in handled}
        old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in handled:
            signal.signal(sig, self._on_signal)
        try:
            return self._run()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake_r.close()
            self._wake_w.close()

    def _run(self) -> int:
        count = self.settings.server.workers
        self.log("INFO", f"starting {count} workers (supervisor pid {os.getpid()})")
        for _ in range(count):
            self._spawn()
        while self.stop_signal is None and self.fatal is None:
            if self.hangup:
                self._reload()
            now = time.monotonic()
            due = [t for t in self.pending if t <= now]
            for t in due:
                self.pending.remove(t)
                self._spawn()
            timeout = max(0.0, min(self.pending) - now) if self.pending else None
            waiting: dict[Any, Worker] = {}
            for worker in self.workers:
                waiting[worker.proc.sentinel] = worker
                if worker.ready_at is None and not worker.ready_conn.closed:
                    waiting[worker.ready_conn] = worker
            woke = wait([*waiting, self._wake_r], timeout)
            for obj in woke:
                if obj is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(512)
                    continue
                worker = waiting[obj]
                if obj is worker.ready_conn and worker.ready_at is None:
                    self._mark_ready(worker)
            for worker in list(self.workers):
                if worker.proc.exitcode is not None:
                    self._reap(worker)
        return self._stop()

    def _stop(self) -> int:
        """Forward the stop to every worker, wait for them, and choose the exit code."""
        signum = self.stop_signal or signal.SIGTERM
        if self.fatal is not None:
            self.log("ERROR", f"stopping: {self.fatal}", event="supervisor_fatal")
        else:
            self.log("INFO", f"{signal.Signals(signum).name}: stopping {len(self.workers)} workers")
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)
        server = self.settings.server
        deadline = (
            time.monotonic()
            + server.drain_delay_secs
            + server.shutdown_timeout_secs
            + STOP_GRACE_SECS
        )
        clean = True
        for worker in list(self.workers):
            worker.proc.join(max(0.0, deadline - time.monotonic()))
            if worker.proc.exitcode is None:
                self.log("ERROR", f"worker {worker.pid} did not stop in time: killed")
                worker.proc.kill()
                worker.proc.join()
                clean = False
            code = worker.proc.exitcode
            # A worker still starting when the signal came dies of it: a clean stop too.
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):
                clean = False
            metrics.worker_exit(worker.pid)
            worker.ready_conn.close()
        self.workers.clear()
        if self.fatal is not None:
            return 1
        self.log("INFO", "all workers stopped", event="supervisor_stopped")
        return 0 if clean else 1
