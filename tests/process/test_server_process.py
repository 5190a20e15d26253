"""The real server process: CLI, SIGTERM draining, the shutdown deadline, workers, log output."""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import (
    child_pids,
    connection_owner,
    wait_for_lines,
)
from tests.support.procs import gateway_process as gateway

WORKER_SERVING = re.compile(r"worker (\d+) is serving")
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()


def mock_config(**options: Any) -> dict[str, Any]:
    return {"inference": {"provider": "mock", "options": options}}


def stream_body(port: int, result: dict[str, Any], started: threading.Event | None = None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "POST", "/v1/chat/completions", body=CHAT, headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()  # the gateway sends its 200 only after the first upstream chunk
    result["status"] = resp.status
    if started is not None:
        started.set()
    try:
        result["body"] = resp.read().decode()
    except http.client.IncompleteRead as exc:  # a cut response: the test asserts on it
        result["body"] = exc.partial.decode()
        result["incomplete"] = True
    conn.close()


def test_sigterm_lets_an_open_stream_finish(tmp_path: Path) -> None:
    config = {
        **mock_config(tokens_per_second=20, reply_tokens=20),
        "server": {"shutdown_timeout_secs": 10},
    }
    with gateway(tmp_path, config) as (proc, port):
        result: dict[str, Any] = {}
        started = threading.Event()
        reader = threading.Thread(target=stream_body, args=(port, result, started))
        reader.start()
        assert started.wait(timeout=20)  # the stream is under way (it lasts ~1 s)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=20)
        assert proc.wait(timeout=20) == 0
    assert result["status"] == 200
    assert result["body"].rstrip().endswith("data: [DONE]")
    assert '"finish_reason":"stop"' in result["body"]


def test_shutdown_deadline_ends_long_streams_with_an_error_event(tmp_path: Path) -> None:
    config = {
        **mock_config(tokens_per_second=5, reply_tokens=100),
        "server": {"shutdown_timeout_secs": 0.5},
    }
    with gateway(tmp_path, config) as (proc, port):
        result: dict[str, Any] = {}
        started = threading.Event()
        reader = threading.Thread(target=stream_body, args=(port, result, started))
        reader.start()
        assert started.wait(timeout=20)
        proc.send_signal(signal.SIGTERM)
        reader.join(timeout=20)
        proc.wait(timeout=20)
    assert result["status"] == 200
    assert "incomplete" not in result
    last = [b for b in result["body"].split("\n\n") if b.strip()][-1]
    assert "[DONE]" not in last
    assert json.loads(last[len("data: ") :])["error"]["code"] == "SERVICE_UNAVAILABLE"
    # The access line records why the stream ended: the shutdown, not a client that left.
    access = [
        line
        for line in (tmp_path / "server.log").read_text().splitlines()
        if "POST /v1/chat/completions" in line
    ]
    assert access
    assert "error=SERVICE_UNAVAILABLE" in access[-1]


def serving_workers(tmp_path: Path, count: int) -> list[int]:
    """Pids of the first ``count`` workers the supervisor saw listening (bounded wait)."""
    lines = wait_for_lines(
        tmp_path / "server.log", lambda line: WORKER_SERVING.search(line) is not None, count, 30
    )
    return [int(m.group(1)) for line in lines if (m := WORKER_SERVING.search(line))]


def get_on_new_connection(port: int, path: str, workers: list[int]) -> tuple[int, int | None]:
    """GET ``path`` on a fresh connection: (status, the worker pid that answered it)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    assert conn.sock is not None
    owner = connection_owner(port, conn.sock.getsockname()[1], workers)  # still open
    conn.close()
    return resp.status, owner


def test_workers_share_one_port(tmp_path: Path) -> None:
    with gateway(tmp_path, mock_config(), "--workers", "2") as (proc, port):
        workers = serving_workers(tmp_path, 2)
        assert sorted(workers) == sorted(child_pids(proc.pid))
        answered: set[int | None] = set()
        for _ in range(200):  # new connections until each worker answered one (2^-200 odds)
            status, owner = get_on_new_connection(port, "/health", workers)
            assert status == 200
            answered.add(owner)
            if answered == set(workers):
                break
        assert answered == set(workers)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_production_logs_are_json_lines(tmp_path: Path) -> None:
    production = {"production": {"logging": {"format": "json"}}}
    with gateway(tmp_path, mock_config(), env={"RUN_ENV": "production"}, sections=production) as (
        proc,
        port,
    ):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=CHAT.replace(b"true", b"false"),
            headers={"Content-Type": "application/json", "x-request-id": "rid-42"},
        )
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    lines = [
        json.loads(line)
        for line in (tmp_path / "server.log").read_text().splitlines()
        if line.startswith("{")
    ]
    access = [r for r in lines if r.get("request_id") == "rid-42" and r.get("event") == "access"]
    assert access, lines
    assert {"time", "level", "message", "request_id", "trace_id", "span_id", "logger"} <= access[
        0
    ].keys()
    assert access[0]["model"] == "gpt-oss-20b"
    assert access[0]["provider"] == "local"


def test_file_logging_with_rotation_settings(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "gw.log"
    config = {
        **mock_config(),
        "logging": {
            "output": "file",
            "format": "json",
            "file": {"path": str(log_file), "rotation": "1 MB", "retention": "2 days"},
        },
    }
    with gateway(tmp_path, config) as (proc, _port):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert any("inference-server" in r["message"] for r in records)


def test_secret_never_logged(tmp_path: Path) -> None:
    config = {
        "inference": {"provider": "mock", "api_key": "sk-super-secret-123"},
        "logging": {"level": "debug"},
    }
    with gateway(tmp_path, config) as (proc, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST", "/v1/chat/completions", body=CHAT, headers={"Content-Type": "application/json"}
        )
        conn.getresponse().read()
        conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert "sk-super-secret-123" not in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("flag", ["--check-config", "--print-config"])
def test_config_flags_do_not_bind(tmp_path: Path, flag: str) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(json.dumps({"default": mock_config()}))
    out = subprocess.run(
        [sys.executable, "-m", "inference_server", "--config", str(settings), flag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


def test_experiment_is_sticky_across_two_workers(tmp_path: Path) -> None:
    config = {
        "providers": {"a": {"plugin": "mock"}, "b": {"plugin": "mock"}},
        "models": {"chat": {"provider": "a"}, "terse": {"provider": "b"}},
        "experiments": {
            "style": {
                "model": "assistant",
                "key": "header:x-session-id",
                "variants": {
                    "control": {"model": "chat", "weight": 50},
                    "terse": {"model": "terse", "weight": 50},
                },
            }
        },
    }
    body = json.dumps({"model": "assistant", "messages": [{"role": "user", "content": "x"}]})
    with gateway(tmp_path, config, "--workers", "2") as (proc, port):
        workers = serving_workers(tmp_path, 2)  # both listen (the readiness probe saw one)
        variants: dict[str, set[str]] = {}
        answered: dict[str, set[int | None]] = {}
        for i in range(120):
            session = f"s{i % 6}"
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # new connection:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=body,  # either worker may answer
                headers={"Content-Type": "application/json", "x-session-id": session},
            )
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            assert conn.sock is not None
            owner = connection_owner(port, conn.sock.getsockname()[1], workers)
            variants.setdefault(session, set()).add(resp.headers["x-inference-variant"])
            answered.setdefault(session, set()).add(owner)
            conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert all(len(v) == 1 for v in variants.values()), variants
    assert len({next(iter(v)) for v in variants.values()}) == 2  # both variants in use
    # Stickiness across workers means something only if both workers answered a session.
    assert any(owners == set(workers) for owners in answered.values()), answered


def test_braces_in_a_path_are_logged_not_interpreted(tmp_path: Path) -> None:
    with gateway(tmp_path, mock_config()) as (proc, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models/%7Bmodel%7D%7B0%7D")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 404
        conn.request("GET", "/")
        assert conn.getresponse().status == 200  # still serving
        conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    assert "/v1/models/{model}{0}" in (tmp_path / "server.log").read_text()
