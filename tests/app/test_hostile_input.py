"""Hostile input through the real app over a real socket (issue 11): each case used to be a 500 or
an empty reply; now each is a 4xx in the error envelope, the upstream is never called, and the
server keeps serving."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sys
import threading
import zlib
from typing import Any

import pytest
from loguru import logger

from inference_server import body as body_mod
from inference_server import logs
from inference_server.context import RequestContext
from inference_server.settings import LogFileSettings, LoggingSettings
from tests.support.fake_upstream import FakeUpstream
from tests.support.rawhttp import RawResponse, request_bytes, send

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
JSON = ("Content-Type", "application/json")


def envelope(resp: RawResponse) -> dict[str, Any]:
    assert not resp.empty, "empty reply"
    assert resp.headers["content-type"].startswith("application/json"), resp.raw[:300]
    body: dict[str, Any] = json.loads(resp.body)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


async def post(port: int, body: bytes, *headers: tuple[str | bytes, str | bytes]) -> RawResponse:
    return await send(port, request_bytes("POST", CHAT, [JSON, *headers], body))


@pytest.fixture
async def port(gateway_for: Any) -> int:
    client = await gateway_for(server={"admin_token": "admin-token-123456"})
    p: int = client.server.port
    return p


@pytest.mark.parametrize(
    "model", ["a\r\nx-injected: yes", "a\nb", "a\rb", "nul\x00", "del\x7f", "c1\x85"]
)
async def test_control_characters_in_model_are_a_400_before_the_upstream(
    port: int, fake_upstream: FakeUpstream, model: str
) -> None:
    resp = await post(port, json.dumps({"model": model, "messages": USER}).encode())
    assert resp.status == 400
    err = envelope(resp)
    assert (err["code"], err["param"]) == ("INVALID_PARAMETER", "model")
    assert "x-injected" not in resp.headers
    assert resp.headers["x-request-id"]
    assert fake_upstream.requests == []


@pytest.mark.parametrize("depth", [65, 254, 300, 1023])
async def test_deeply_nested_json_is_a_400(port: int, fake_upstream: FakeUpstream, depth: int):
    deep = "[" * (depth - 2) + "]" * (depth - 2)
    body = f'{{"messages": [{{"role": "user", "content": "x", "extra": {deep}}}]}}'.encode()
    resp = await post(port, body)
    assert resp.status == 400
    assert envelope(resp)["code"] == "INVALID_JSON"
    assert fake_upstream.requests == []


async def test_json_nested_within_the_limit_still_works(port: int, fake_upstream: FakeUpstream):
    deep: Any = "x"
    for _ in range(50):
        deep = {"d": deep}
    body = json.dumps({"messages": [{"role": "user", "content": "x", "extra": deep}]})
    resp = await post(port, body.encode())
    assert resp.status == 200
    assert len(fake_upstream.requests) == 1


@pytest.mark.parametrize("role", [["user"], {"x": 1}, 7])
async def test_non_string_role_is_a_400(port: int, role: Any) -> None:
    resp = await post(port, json.dumps({"messages": [{"role": role, "content": "x"}]}).encode())
    assert resp.status == 400
    assert envelope(resp)["param"] == "messages.0.role"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_corrupt_compressed_body_is_a_400(port: int, encoding: str) -> None:
    resp = await post(port, b'{"messages": []}', ("Content-Encoding", encoding))
    assert resp.status == 400
    assert envelope(resp)["code"] == "INVALID_JSON"


@pytest.mark.parametrize("encoding", ["foo", "gzip, identity", "compress", "x" * 300])
async def test_unknown_content_encoding_is_a_415(port: int, encoding: str) -> None:
    resp = await post(port, json.dumps({"messages": USER}).encode(), ("Content-Encoding", encoding))
    assert resp.status == 415
    err = envelope(resp)
    assert err["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert len(err["message"]) < 200


@pytest.mark.parametrize(
    ("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)]
)
async def test_compressed_bodies_still_work(
    port: int, fake_upstream: FakeUpstream, encoding: str, compress: Any
) -> None:
    body = compress(json.dumps({"messages": USER}).encode())
    resp = await post(port, body, ("Content-Encoding", encoding))
    assert resp.status == 200, resp.raw[:300]


@pytest.mark.parametrize(
    "token", [b"Bearer \xff\xfe", b"Bearer \xc3", b"bearer \xed\xa0\x80", b"Bearer " + b"x" * 4000]
)
async def test_undecodable_admin_token_is_a_401(port: int, token: bytes) -> None:
    data = request_bytes("GET", "/admin/experiments", [("Authorization", token)])
    resp = await send(port, data)
    assert resp.status == 401
    assert envelope(resp)["code"] == "UNAUTHORIZED"
    ok = request_bytes(
        "GET", "/admin/experiments", [("Authorization", "Bearer admin-token-123456")]
    )
    assert (await send(port, ok)).status == 200


async def test_non_ascii_request_id_is_replaced(port: int) -> None:
    data = request_bytes("GET", "/", [("x-request-id", b"caf\xc3\xa9\xff")])
    resp = await send(port, data)
    assert resp.status == 200
    assert resp.headers["x-request-id"].startswith("req_")


async def test_large_body_is_validated_off_the_loop_with_the_same_answers(
    port: int, fake_upstream: FakeUpstream
) -> None:
    parts = [{"type": "text", "text": "x" * 100}] * 2000  # ~250 KB, the marshmallow path
    good = {"messages": [{"role": "user", "content": parts}]}
    resp = await post(port, json.dumps(good).encode())
    assert resp.status == 200
    assert fake_upstream.requests[-1]["messages"][0]["content"] == parts
    bad = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": 5}]}]}
    resp = await post(port, json.dumps(bad).encode())
    assert resp.status == 400
    assert envelope(resp)["param"] == "messages.0.content"
    resp = await post(port, json.dumps({**good, "stream": "yes"}).encode())
    assert envelope(resp)["param"] == "stream"


async def test_big_bodies_are_validated_while_the_loop_keeps_serving(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a large body is parsed and validated, ``GET /`` is answered: the work runs on a
    worker thread.  (Held there by an event, so the test does not depend on timing.)"""
    entered, release = threading.Event(), threading.Event()
    original = body_mod._parse_and_validate

    def held(raw: bytes, validate: Any) -> Any:
        entered.set()
        release.wait(10)
        return original(raw, validate)

    monkeypatch.setattr(body_mod, "_parse_and_validate", held)
    parts = [{"type": "text", "text": "y" * 60}] * 2_000
    big = json.dumps({"messages": [{"role": "user", "content": parts}], "stream": "yes"})
    task = asyncio.create_task(post(port, big.encode()))
    try:
        for _ in range(500):
            if entered.is_set():
                break
            await asyncio.sleep(0.01)
        assert entered.is_set()
        resp = await send(port, request_bytes("GET", "/", []), timeout=5)
        assert resp.status == 200
        assert not task.done()
    finally:
        release.set()
    assert envelope(await task)["param"] == "stream"


def test_crlf_in_the_path_cannot_forge_a_pretty_log_line(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    path = tmp_path / "gw.log"
    try:
        logs.setup_logging(
            LoggingSettings(
                level="info",
                format="pretty",
                output="file",
                access_log=True,
                file=LogFileSettings(path=str(path), rotation="1 MB", retention="1 day"),
            )
        )
        ctx = RequestContext(request_id="req-1")
        ctx.model = "m\nFORGED"
        logs.access(ctx, "GET", "/x\r\n2026-01-01 00:00:00.000 | INFO | forged", 404, 0.001)
        logger.complete()
        lines = path.read_text().splitlines()
    finally:
        logger.remove()
        logger.add(sys.stderr)
        root.handlers[:], level = saved
        root.setLevel(level)
    assert len(lines) == 1, lines
    assert "\\r\\n" in lines[0]


async def test_undecodable_header_echoed_in_an_error_is_a_400(
    make_settings: Any, make_gateway: Any, make_fake_upstream: Any
) -> None:
    """A forced variant that names no variant is echoed in the message; as undecodable bytes it
    used to make the error unencodable (a 500 with aiohttp's own body)."""
    from tests.integration.test_routing import experiment_settings

    a, b = await make_fake_upstream(), await make_fake_upstream()
    cfg = experiment_settings(a, b)
    cfg["experiments"]["prompt-style"]["allow_override"] = True
    client = await make_gateway(make_settings(cfg))
    body = json.dumps({"model": "assistant", "messages": USER}).encode()
    resp = await post(client.server.port, body, ("x-inference-variant", b"no\xff\xfe"))
    assert resp.status == 400
    err = envelope(resp)
    assert err["code"] == "UNKNOWN_VARIANT"
    assert "no\\udcff\\udcfe" in err["message"]


async def test_undecodable_sticky_key_header_is_not_a_500(
    make_settings: Any, make_gateway: Any, make_fake_upstream: Any
) -> None:
    from tests.integration.test_routing import experiment_settings

    a, b = await make_fake_upstream(), await make_fake_upstream()
    cfg = experiment_settings(a, b)
    cfg["experiments"]["prompt-style"]["key"] = "api_key"
    client = await make_gateway(make_settings(cfg))
    body = json.dumps({"model": "assistant", "messages": USER}).encode()
    resp = await post(client.server.port, body, ("Authorization", b"Bearer \xff\xfe"))
    assert resp.status == 200
