"""Fuzz tier: hypothesis-generated chat bodies, headers and query strings against a real gateway
process (``python -m inference_server``) in front of a fake upstream, over raw sockets.

Every reply must be a well-formed JSON error envelope, a valid completion or a valid stream (or,
for bytes aiohttp's HTTP parser refuses before the app sees them, its plain-text 400); never a
5xx (the upstream always succeeds, so a 5xx can only come from the input), never an empty reply;
the process keeps serving, its RSS after the run is within a few MB of before, and every line
it logged (JSON, INFO: the production setup) is one well-formed JSON object.

``make test`` runs ``FUZZ_EXAMPLES`` (default 1000) examples per kind, about 5,000 requests in
well under a minute; ``make fuzz`` runs many more (``FUZZ_EXAMPLES=20000``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import free_port, log_tail, running_process
from tests.support.rawhttp import RawResponse, request_bytes, send_sync

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
#: Allowed RSS growth of the gateway over the whole run, after a warm-up.
RSS_SLACK_KB = int(os.environ.get("FUZZ_RSS_SLACK_KB", str(8 * 1024)))
ADMIN = "fuzz-admin-token-0123456789"
CHAT = "/v1/chat/completions"
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the servers ---------------------------------------------------------------------------------


class UpstreamThread:
    """The fake upstream served by its own event loop on a thread (the gateway is a process)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.fake = FakeUpstream()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.fake.app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> UpstreamThread:
        self.thread.start()
        assert self.ready.wait(10), "fake upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Gateway:
    def __init__(self, pid: int, port: int, log: Path) -> None:
        self.pid, self.port, self.log = pid, port, log

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def send(self, data: bytes) -> RawResponse:
        return send_sync(self.port, data, timeout=15)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with UpstreamThread() as upstream:
        port = free_port()
        config = {
            # Production logging: JSON lines at INFO (the direct access-line writer), so the
            # run also checks that no client byte ever breaks a line.
            "logging": {"level": "info", "format": "json"},
            "server": {"admin_token": ADMIN, "max_body_bytes": 1024 * 1024},
            "inference": {
                "base_url": f"http://127.0.0.1:{upstream.port}/v1",
                "retry_backoff_base_secs": 0.001,
                "retry_backoff_max_secs": 0.01,
            },
            "metrics": {"max_label_values": 20},
        }
        (tmp / "settings.yaml").write_text(json.dumps({"default": config}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_")}
        env.pop("RUN_ENV", None)
        cmd = [sys.executable, "-m", "inference_server", "--config", str(tmp / "settings.yaml")]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        log = tmp / "gateway.log"
        with running_process(
            cmd, env=env, ready_url=f"http://127.0.0.1:{port}/", timeout=30, log_path=log
        ) as proc:
            yield Gateway(proc.pid, port, log)


# --- what every reply must be --------------------------------------------------------------------


def check_reply(resp: RawResponse, *, chat: bool = False) -> None:
    """A well-formed reply: never empty, never a 5xx, a JSON envelope for every error."""
    assert not resp.empty, "empty reply"
    assert 100 <= resp.status < 500, (resp.status, resp.raw[:500])
    ctype = resp.headers.get("content-type", "")
    if resp.status >= 400:
        if ctype.startswith("text/plain") and resp.status == 400:
            return  # aiohttp's HTTP parser refused the bytes before the app saw them
        assert ctype.startswith("application/json"), resp.raw[:500]
        body = json.loads(resp.body)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str)
        assert body["error"]["message"]
        assert "x-request-id" in resp.headers
        return
    if chat:
        if ctype.startswith("text/event-stream"):
            text = resp.body.decode()
            assert text.endswith("data: [DONE]\n\n") or '"error"' in text, text[-500:]
            for event in text.split("\n\n"):
                if event.startswith("data: {"):
                    json.loads(event.removeprefix("data: "))
        else:
            completion = json.loads(resp.body)
            assert completion["object"] == "chat.completion", completion
    elif ctype.startswith("application/json"):
        json.loads(resp.body)


# --- strategies ----------------------------------------------------------------------------------

NASTY = st.sampled_from(
    ["\r\n", "\n", "\r", "\x00", "\x7f", "\x85", "\u2028", "\ud800", "%0d%0a", "{}", "'", '"']
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, n, b: a + n + b, st.text(max_size=10), NASTY, st.text(max_size=10)),
    st.sampled_from(["gpt-oss-20b", "llama-2-7b", "m" * 300, ""]),
)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSONISH = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
ROLE = st.one_of(
    st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), JSONISH
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, JSONISH)}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": TEXT})}
    ),
    JSONISH,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": ROLE, "content": st.one_of(TEXT, st.lists(PART, max_size=3), JSONISH)},
        optional={"name": st.one_of(TEXT, JSONISH), "tool_call_id": st.one_of(TEXT, JSONISH)},
    ),
    JSONISH,
)
PARAMS = {
    key: st.one_of(SCALAR, JSONISH)
    for key in [
        "model",
        "temperature",
        "top_p",
        "frequency_penalty",
        "presence_penalty",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "stop",
        "seed",
        "user",
        "tools",
        "logprobs",
    ]
}
PARAMS["stream"] = st.one_of(st.booleans(), SCALAR)
PARAMS["stream_options"] = st.one_of(
    st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), SCALAR)}), JSONISH
)
PARAMS["model"] = st.one_of(TEXT, JSONISH)
CHAT_BODY = st.one_of(
    st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(MESSAGE, min_size=0, max_size=4), JSONISH)},
        optional=PARAMS,
    ),
    JSONISH,
)


def deep(depth: int) -> str:
    return (
        '{"messages": [{"role": "user", "content": "x", "d": ' + "[" * depth + "]" * depth + "}]}"
    )


def encode_body(value: Any, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


RAW_BODY = st.one_of(
    st.none(),
    st.none(),
    st.none(),
    st.binary(max_size=64),
    st.integers(min_value=60, max_value=1100).map(lambda d: deep(d).encode()),
)
HEADER_VALUE = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
HEADERS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "Content-Type",
                "Content-Encoding",
                "Authorization",
                "x-request-id",
                "traceparent",
                "tracestate",
                "x-inference-variant",
                "Accept",
                "X-Custom",
            ]
        ),
        st.one_of(
            HEADER_VALUE,
            st.sampled_from(
                [
                    b"application/json",
                    b"text/plain",
                    b"gzip",
                    b"deflate",
                    b"br",
                    b"identity",
                    b"foo",
                    b"Bearer \xff\xfe",
                    f"Bearer {ADMIN}".encode(),
                    b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ]
            ),
        ),
    ),
    max_size=5,
)
PATHS = st.sampled_from(
    ["/", "/health", "/v1/models", "/v1/models/gpt-oss-20b", "/metrics", "/admin/experiments"]
)
QUERY = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c > 0x20 and c not in (0x7F, ord("#")))
)


# --- the run -------------------------------------------------------------------------------------


def warm_up(gateway: Gateway) -> None:
    """Fill what legitimately grows once (label caps, pools, caches) before measuring RSS."""
    for i in range(300):
        body: dict[str, Any] = {
            "model": f"warm-{i % 40}",
            "messages": [{"role": "user", "content": "hi"}],
        }
        if i % 3 == 0:
            body["stream"] = True
        check_reply(
            gateway.send(
                request_bytes(
                    "POST", CHAT, [("Content-Type", "application/json")], json.dumps(body).encode()
                )
            ),
            chat=True,
        )
        check_reply(gateway.send(request_bytes("GET", f"/v1/models/m{i}?q={i}", [])))
        bad = [b"{", b'{"messages": []}', b'{"messages": [{"role": 1}]}', b'{"model": "\\u0000"}']
        ctype = [("Content-Type", "application/json" if i % 5 else "text/plain")]
        check_reply(gateway.send(request_bytes("POST", CHAT, ctype, bad[i % len(bad)])))


def test_fuzz_bodies_headers_and_queries(gateway: Gateway) -> None:
    warm_up(gateway)
    before = gateway.rss_kb()

    @FUZZ
    @given(body=CHAT_BODY, raw=RAW_BODY)
    def bodies(body: Any, raw: bytes | None) -> None:
        data = request_bytes(
            "POST", CHAT, [("Content-Type", "application/json")], encode_body(body, raw)
        )
        check_reply(gateway.send(data), chat=True)

    @FUZZ
    @given(headers=HEADERS, stream=st.booleans())
    def headers(headers: list[tuple[str, bytes]], stream: bool) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
        data = request_bytes("POST", CHAT, list(headers), json.dumps(body).encode())
        check_reply(gateway.send(data), chat=True)
        check_reply(gateway.send(request_bytes("GET", "/admin/experiments", list(headers))))

    @FUZZ
    @given(path=PATHS, query=QUERY, model=TEXT)
    def queries(path: str, query: bytes, model: str) -> None:
        check_reply(gateway.send(request_bytes("GET", path.encode() + b"?" + query, [])))
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}]})
        target = CHAT.encode() + b"?" + query
        data = request_bytes("POST", target, [("Content-Type", "application/json")], body.encode())
        check_reply(gateway.send(data), chat=True)

    try:
        bodies()
        headers()
        queries()
    except BaseException:
        print(log_tail(gateway.log))
        raise
    after = gateway.rss_kb()
    print(f"gateway RSS {before} KB before, {after} KB after the run")
    assert gateway.send(request_bytes("GET", "/", [])).status == 200
    assert after - before <= RSS_SLACK_KB, f"RSS grew {after - before} KB ({before} → {after})"
    log = gateway.log.read_text()
    assert "unhandled error" not in log
    for line in log.splitlines():  # one JSON object per line, whatever the clients sent
        assert isinstance(json.loads(line), dict), line
