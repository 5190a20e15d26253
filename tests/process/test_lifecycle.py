"""The real process's life: start-up on a busy port, the shutdown deadline with an upstream that
never answers, and ``--workers`` supervision (a worker killed with SIGKILL is replaced)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.process.test_server_process import WORKER_SERVING, mock_config, serving_workers
from tests.support.procs import (
    child_pids,
    connection_owner,
    wait_for_lines,
)
from tests.support.procs import gateway_process as gateway


class SilentUpstream:
    """Accepts connections and reads requests but never answers (a model stuck before its first
    byte).  ``chat_requests`` counts chat requests that fully arrived."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.chat_requests = 0
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        data = b""
        conn.settimeout(30)
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
        except OSError:
            return
        if b"/chat/completions" in data.split(b"\r\n", 1)[0]:
            with self.lock:
                self.chat_requests += 1

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.chat_requests >= count:
                    return
            time.sleep(0.02)
        raise AssertionError(f"the upstream saw {self.chat_requests} of {count} requests")

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        for conn in self.conns:
            conn.close()


@contextmanager
def silent_upstream() -> Iterator[SilentUpstream]:
    upstream = SilentUpstream()
    try:
        yield upstream
    finally:
        upstream.close()


def post_chat(port: int, stream: bool, result: dict[str, Any]) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        result["status"] = resp.status
        result["body"] = resp.read()
        result["type"] = resp.headers.get("Content-Type")
    except (OSError, http.client.HTTPException) as exc:
        result["error"] = repr(exc)
    finally:
        conn.close()


def test_requests_waiting_for_the_upstream_are_answered_at_the_shutdown_deadline(
    tmp_path: Path,
) -> None:
    """shutdown_timeout_secs 2: both requests get a 503 JSON and the process is gone by 3 s."""
    with silent_upstream() as upstream:
        config = {
            "inference": {
                "provider": "lmstudio",
                "base_url": f"http://127.0.0.1:{upstream.port}/v1",
                "timeout_secs": 60,
                "max_retries": 0,
            },
            "server": {"shutdown_timeout_secs": 2},
        }
        with gateway(tmp_path, config) as (proc, port):
            results: list[dict[str, Any]] = [{}, {}]
            threads = [
                threading.Thread(target=post_chat, args=(port, stream, result))
                for stream, result in zip((False, True), results, strict=True)
            ]
            for thread in threads:
                thread.start()
            upstream.wait_for(2, timeout=20)  # both wait for the upstream's first byte
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=20)
            took = time.monotonic() - began
            for thread in threads:
                thread.join(timeout=10)
    assert code == 0
    assert took <= 2 + 1, f"exited {took:.2f} s after SIGTERM"
    for result in results:
        assert result.get("status") == 503, result
        assert result["type"] == "application/json"
        assert json.loads(result["body"])["error"]["code"] == "SERVICE_UNAVAILABLE"
    log = (tmp_path / "server.log").read_text()
    assert "499" not in log


def test_a_busy_port_is_one_clear_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:  # listening, no SO_REUSEPORT
        port = holder.getsockname()[1]
        settings = tmp_path / "settings.yaml"
        settings.write_text(json.dumps({"default": mock_config()}))
        for extra in ([], ["--workers", "2"]):
            cmd = [sys.executable, "-m", "inference_server", "--config", str(settings)]
            out = subprocess.run(
                [*cmd, "--host", "127.0.0.1", "--port", str(port), *extra],
                capture_output=True,
                text=True,
                timeout=60,
            )
            text = out.stdout + out.stderr
            assert out.returncode != 0, text
            assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in text
            assert "Traceback" not in text
            assert "listening on" not in text  # said only once bound
    assert out.returncode == 1  # --workers: the supervisor stops instead of restarting
    assert "cannot start" in text


def metric_values(port: int, name: str) -> dict[str, float]:
    """``{labels: value}`` of one metric from ``/metrics`` (any worker: the merged view)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def chat_in_flight(port: int) -> float:
    values = metric_values(port, "inference_requests_in_flight")
    return sum(v for k, v in values.items() if "/v1/chat/completions" in k)


def test_a_killed_worker_is_replaced_and_leaves_no_stale_gauges(tmp_path: Path) -> None:
    config = {**mock_config(latency_ms=60_000), "server": {"shutdown_timeout_secs": 2}}
    with gateway(tmp_path, config, "--workers", "2") as (proc, port):
        workers = serving_workers(tmp_path, 2)
        # A slow request in flight on one worker: that worker is the victim.
        slow = socket.create_connection(("127.0.0.1", port))
        body = b'{"messages": [{"role": "user", "content": "hi"}]}'
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        victim = None
        deadline = time.monotonic() + 20
        while victim is None or chat_in_flight(port) < 1:
            assert time.monotonic() < deadline, "the slow request never started"
            victim = victim or connection_owner(port, slow.getsockname()[1], workers)
            time.sleep(0.05)
        assert victim in workers
        os.kill(victim, signal.SIGKILL)
        died = wait_for_lines(
            tmp_path / "server.log",
            lambda line: f"worker {victim} was killed by SIGKILL" in line,
            1,
            20,
        )
        assert "restarting" in died[0]
        serving = serving_workers(tmp_path, 3)
        replacement = serving[2]
        assert replacement not in workers
        assert sorted(child_pids(proc.pid)) == sorted({*workers, replacement} - {victim})
        # The dead worker's in-flight gauge is gone from the merged view (it held 1).
        assert chat_in_flight(port) == 0
        pids = {k for k in metric_values(port, "inference_build_info")}
        assert not any(f'pid="{victim}"' in k for k in pids), pids
        # The replacement serves: new connections until one lands on it.
        live = [p for p in (*workers, replacement) if p != victim]
        for _ in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert conn.sock is not None
            owner = connection_owner(port, conn.sock.getsockname()[1], live)
            conn.close()
            if owner == replacement:
                break
        assert owner == replacement
        slow.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    assert WORKER_SERVING.search((tmp_path / "server.log").read_text())


def test_stalled_clients_at_a_low_file_limit_get_503s_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    """ulimit -n 128: the derived cap is (128 - 64) / 2 = 32 connections.  100 clients that
    never finish their headers: those over the cap get a JSON 503 at once, the rest are cut at
    the header timeout, nothing runs out of descriptors, and the server answers afterwards."""
    config = {**mock_config(), "server": {"header_timeout_secs": 1}}
    ulimit = ("sh", "-c", 'ulimit -n 128 && exec "$0" "$@"')
    with gateway(tmp_path, config, prefix=ulimit) as (proc, port):
        clients = []
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never ends
            clients.append(sock)
        answers = []
        for sock in clients:
            data = b""
            try:
                while chunk := sock.recv(65536):  # until the server closes (bounded by timeout)
                    data += chunk
            except ConnectionResetError:
                data += b"<RESET>"
            answers.append(data)
            sock.close()
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
        assert len(refused) >= 100 - 32
        assert len(refused) + len(timed_out) == 100
        assert b'"GATEWAY_OVERLOADED"' in refused[0]
        assert proc.poll() is None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=b'{"messages": [{"role": "user", "content": "hi"}]}',
            headers={"Content-Type": "application/json"},
        )
        assert conn.getresponse().status == 200
        conn.close()
    log = (tmp_path / "server.log").read_text()
    assert "Too many open files" not in log
    assert "Traceback" not in log
    assert "connection cap reached" in log


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    config = {**mock_config(), "server": {"shutdown_timeout_secs": 1}}
    with gateway(tmp_path, config, "--workers", "2") as (proc, port):
        workers = serving_workers(tmp_path, 2)
        proc.kill()  # SIGKILL to the supervisor only: the workers are orphaned
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, "orphaned workers still running"
            time.sleep(0.1)
        with socket.socket() as probe:  # nobody listens on the port any more
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    assert "the supervisor" in (tmp_path / "server.log").read_text()
