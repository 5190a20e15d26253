"""Reading a request body as JSON, bounded in every dimension a client controls.

Why each check is here, before anything else touches the body:

* **Content-Type / Content-Encoding.** aiohttp decompresses ``gzip``, ``deflate`` (and ``br`` /
  ``zstd`` when their libraries are installed; otherwise its parser answers 400 itself) and
  passes any *other* coding through undecoded, so an unknown ``Content-Encoding`` is a 415 here
  instead of a confusing "malformed JSON".  A corrupt compressed body surfaces as
  ``web.RequestPayloadError`` from ``request.read()``: a 400, never a 500.
* **Nesting depth.** orjson parses up to 1024 levels but serializes only ~254, so a body nested
  deeper than that used to be accepted and then fail with a 500 while the upstream body was
  built.  Anything deeper than :data:`MAX_JSON_DEPTH` is a 400 right after parsing, checked
  iteratively (no recursion) and skipped outright when the body cannot be that deep.
* **Size and time.** aiohttp enforces ``server.max_body_bytes`` (413).  A body larger than
  :data:`OFFLOAD_BYTES` is parsed, depth-checked and validated on a worker thread, so a 10 MB
  body on the marshmallow path no longer stops the event loop for a third of a second (the
  thread still takes the GIL, but the loop gets it back every switch interval, ~5 ms).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from inference_server.errors import InvalidRequest, UnsupportedMediaType
from inference_server.keys import SETTINGS
from inference_server.schemas import ValidatedBody, validate_chat
from inference_server.server import read_body

#: Deepest accepted JSON nesting (objects and arrays).  A constant, not a setting: OpenAI request
#: bodies (tool JSON schemas included) stay far below it, and orjson cannot write ~254 levels.
MAX_JSON_DEPTH: Final = 64
#: Bodies larger than this are parsed and validated off the event loop (a thread hand-off costs
#: ~0.1 ms, which only matters for bodies far smaller than this).
OFFLOAD_BYTES: Final = 64 * 1024
#: Content-Encodings aiohttp decodes before the handler sees the body (see the module docstring).
ENCODINGS: Final = frozenset({"identity", "gzip", "deflate", "br", "zstd"})


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON ``value`` nests objects/arrays more than ``limit`` levels deep.

    Level by level, without recursion: the cost is one visit per container element and the
    memory one list per level, whatever the input.
    """
    level: list[Any] = [value] if type(value) is dict or type(value) is list else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                kind = type(child)
                if kind is dict or kind is list:
                    below.append(child)
        level = below
    return False


def parse(raw: bytes) -> Any:
    """``raw`` as JSON, or a 400 for malformed or too deeply nested JSON."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Malformed JSON body: {exc}", code="INVALID_JSON") from exc
    # An upper bound first: fewer brackets than the limit (counting those inside strings too)
    # cannot nest deeper, and two C-speed counts are cheaper than walking the parsed value.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and too_deep(value):
        raise InvalidRequest(
            f"JSON body is nested more than {MAX_JSON_DEPTH} levels deep", code="INVALID_JSON"
        )
    return value


#: One large body at a time is parsed and validated (per process): threads waiting on a lock do
#: not hold the GIL, so the event loop competes with one busy thread, not with one per body.
_ONE_AT_A_TIME: Final = threading.Lock()


def _parse_and_validate(raw: bytes, validate: Callable[[Any], dict[str, Any]]) -> ValidatedBody:
    with _ONE_AT_A_TIME:
        return ValidatedBody(validate(parse(raw)))


def _check_headers(request: web.Request) -> None:
    headers = request.headers
    # What every SDK sends, recognised without aiohttp parsing the header (~1 µs per request).
    if headers.get("Content-Type") != "application/json":
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got '{_shown(ctype) or 'none'}'"
            )
    encoding = headers.get("Content-Encoding")
    if encoding is not None and encoding.strip().lower() not in ENCODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding '{_shown(encoding)}' is not supported "
            "(use identity, gzip, deflate or br)",
            param="Content-Encoding",
        )


def _shown(text: str, limit: int = 64) -> str:
    """A client's header value as it may appear in an error message: bounded, printable."""
    text = text[:limit]
    return text if text.isprintable() else text.encode("ascii", "backslashreplace").decode()


async def read_json(
    request: web.Request, validate: Callable[[Any], dict[str, Any]] = validate_chat
) -> Any:
    """The body as JSON: 415 for another content type or coding, 400 for malformed, corrupt or
    too deeply nested JSON, 413 if too big.  A large body is also run through ``validate`` on a
    worker thread and comes back as a :class:`ValidatedBody` (validating it again is free)."""
    _check_headers(request)
    server = request.app[SETTINGS].server
    try:
        raw = await read_body(  # 413 over max_body_bytes, 408 when it stalls
            request,
            max_bytes=server.max_body_bytes,
            total_secs=server.body_timeout_secs,
            idle_secs=server.body_idle_timeout_secs,
        )
    except web.RequestPayloadError as exc:
        raise InvalidRequest(
            "Request body could not be decoded (corrupt or truncated compressed data?)",
            code="INVALID_JSON",
        ) from exc
    if not raw:
        raise InvalidRequest("Request body is empty", code="INVALID_JSON")
    if len(raw) > OFFLOAD_BYTES:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _parse_and_validate, raw, validate)
    return parse(raw)


async def read_validated(
    request: web.Request, validate: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """The body read by :func:`read_json` and validated by ``validate`` (the endpoint's own
    schema), on a worker thread when the body is large, else here."""
    body = await read_json(request, validate)
    return body if type(body) is ValidatedBody else validate(body)
