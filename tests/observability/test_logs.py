"""Logs on their own: every line of a request carries request, trace and span ids; JSON lines
have stable fields; the access and slow-request lines carry their facts as fields."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from opentelemetry.sdk.trace import TracerProvider

from inference_server import logs
from inference_server.context import RequestContext
from inference_server.settings import LogFileSettings, LoggingSettings

FIXED = ["time", "level", "message", "request_id", "trace_id", "span_id", "logger"]


@pytest.fixture
def log_to(tmp_path: Path) -> Iterator[Callable[[str], Callable[[], list[str]]]]:
    """Configure logging to a file in ``fmt``; returns a reader of the lines written so far."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiohttp.access").disabled)
    path = tmp_path / "gw.log"

    def configure(fmt: str) -> Callable[[], list[str]]:
        logs.setup_logging(
            LoggingSettings(
                level="debug",
                format=fmt,
                output="file",
                access_log=True,
                file=LogFileSettings(path=str(path), rotation="10 MB", retention="1 day"),
            )
        )

        def read() -> list[str]:
            logger.complete()  # the sink is enqueued: wait for the writer thread
            return path.read_text().splitlines()

        return read

    yield configure
    logger.remove()
    logger.add(sys.stderr)
    root.handlers[:], level, disabled = saved
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = disabled


def request(rid: str = "req-1") -> RequestContext:
    return RequestContext(request_id=rid)


def test_json_lines_correlate_request_trace_and_span(log_to: Any) -> None:
    read = log_to("json")
    tracer = TracerProvider().get_tracer("test")
    ctx = request()
    with logs.request_scope(ctx.request_id):
        with tracer.start_as_current_span("server") as server:
            ids = logs.span_ids(server)
            assert ids is not None
            ctx.set_trace(*ids)
            ctx.log.info("via ctx.log")
            with tracer.start_as_current_span("attempt") as attempt:
                logger.warning("via the global logger, e.g. a breaker")
                logging.getLogger("aiohttp.client").error("via stdlib logging")
        ctx.log.info("after the server span ended (the access line)")
    logger.info("outside any request")
    lines = [json.loads(line) for line in read()]
    assert all(list(rec)[: len(FIXED)] == FIXED for rec in lines)  # stable names and order
    trace_id = f"{server.get_span_context().trace_id:032x}"
    server_id = f"{server.get_span_context().span_id:016x}"
    attempt_id = f"{attempt.get_span_context().span_id:016x}"
    by_message = {rec["message"]: rec for rec in lines}
    first = by_message["via ctx.log"]
    assert (first["request_id"], first["trace_id"], first["span_id"]) == (
        "req-1",
        trace_id,
        server_id,
    )
    for message in ("via the global logger, e.g. a breaker", "via stdlib logging"):
        rec = by_message[message]
        assert (rec["request_id"], rec["trace_id"], rec["span_id"]) == (
            "req-1",
            trace_id,
            attempt_id,
        )
    assert by_message["via stdlib logging"]["logger"] == "aiohttp.client"
    after = by_message["after the server span ended (the access line)"]
    assert (after["trace_id"], after["span_id"]) == (trace_id, server_id)
    outside = by_message["outside any request"]
    assert (outside["request_id"], outside["trace_id"], outside["span_id"]) == ("-", "-", "-")


def test_without_tracing_lines_still_carry_the_request_id(log_to: Any) -> None:
    read = log_to("json")
    with logs.request_scope("req-2"):
        logger.info("no span")
    rec = json.loads(read()[-1])
    assert (rec["request_id"], rec["trace_id"], rec["span_id"]) == ("req-2", "-", "-")


def test_access_and_slow_request_lines_have_fields(log_to: Any) -> None:
    read = log_to("json")
    ctx = request("req-3")
    ctx.model, ctx.provider, ctx.deployment = "gpt-oss-20b", "local", "local/gpt-oss-20b"
    ctx.attempts, ctx.retries, ctx.status = 2, 1, 200
    ctx.queue_secs, ctx.upstream_secs = 0.002, 3.0
    ctx.usage = {"prompt_tokens": 3, "completion_tokens": 5}
    ctx.cache = "miss"
    logs.access(ctx, "POST", "/v1/chat/completions", 200, 3.5)
    assert logs.slow_request(ctx, 3.5, threshold_secs=2.0)
    assert not logs.slow_request(ctx, 1.5, threshold_secs=2.0)
    assert not logs.slow_request(ctx, 99.0, threshold_secs=0)  # 0: off
    access, slow = (json.loads(line) for line in read())
    assert access["event"] == "access"
    assert access["message"] == "POST /v1/chat/completions 200 3500.0ms"
    assert access["status"] == 200
    assert access["duration_ms"] == 3500.0
    assert (access["model"], access["provider"], access["deployment"]) == (
        "gpt-oss-20b",
        "local",
        "local/gpt-oss-20b",
    )
    assert (access["attempts"], access["retries"], access["fallbacks"]) == (2, 1, 0)
    assert access["cache"] == "miss"
    assert slow["event"] == "slow_request"
    assert slow["level"] == "warning"
    assert slow["request_id"] == "req-3"
    assert slow["queue_ms"] == 2.0
    assert slow["upstream_ms"] == 3000.0
    assert slow["overhead_ms"] == 500.0
    assert slow["first_token_ms"] is None
    assert slow["output_tokens"] == 5


@pytest.mark.differential
def test_direct_access_line_is_the_line_loguru_writes(
    log_to: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON to stdout writes access lines without loguru: same fields, order and values."""
    ctx = request("req-5")
    ctx.model, ctx.provider, ctx.deployment = "m", "p", "p/m"
    ctx.attempts, ctx.retries, ctx.fallbacks, ctx.error_code = 3, 1, 1, "PROVIDER_TIMEOUT"
    ctx.set_variant("exp", "b")
    ctx.set_trace("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
    read = log_to("json")
    logs.access(ctx, "POST", "/v1/{odd} path", 504, 0.25)
    via_loguru = json.loads(read()[-1])
    logs.setup_logging(
        LoggingSettings(
            level="info",
            format="json",
            output="stdout",
            access_log=True,
            file=LogFileSettings(path="unused", rotation="1 MB", retention="1 day"),
        )
    )
    capsys.readouterr()
    logs.access(ctx, "POST", "/v1/{odd} path", 504, 0.25)
    for sink in logs._SINKS:
        sink.drain()
    direct = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(direct) == list(via_loguru)
    via_loguru.pop("time")
    stamp = direct.pop("time")
    assert direct == via_loguru
    assert stamp[:2] == "20"
    assert stamp[19] == "."
    assert stamp[26] in "+-"
    # Above INFO, loguru would drop the line; so does the direct writer.
    logs.setup_logging(
        LoggingSettings(
            level="warning",
            format="json",
            output="stdout",
            access_log=True,
            file=LogFileSettings(path="unused", rotation="1 MB", retention="1 day"),
        )
    )
    logs.access(ctx, "GET", "/", 200, 0.001)
    for sink in logs._SINKS:
        sink.drain()
    assert capsys.readouterr().out == ""


def test_a_long_stream_is_slow_only_when_its_first_token_was() -> None:
    ctx = request()
    ctx.stream, ctx.first_token_secs, ctx.stream_secs = True, 0.3, 60.0
    assert not logs.slow_request(ctx, 60.3, threshold_secs=10)
    ctx.first_token_secs = 12.0
    assert logs.slow_request(ctx, 72.0, threshold_secs=10)


def test_pretty_lines_show_ids_and_fields(log_to: Any) -> None:
    read = log_to("pretty")
    tracer = TracerProvider().get_tracer("test")
    ctx = request("req-4")
    ctx.model = "m"
    with tracer.start_as_current_span("server") as span:
        logs.access(ctx, "GET", "/v1/models", 200, 0.001)
    line = read()[-1]
    assert "| req-4 | GET /v1/models 200 1.0ms" in line
    assert "model=m" in line
    assert f"trace_id={span.get_span_context().trace_id:032x}" in line
    assert " event=" not in line  # said by the message already
