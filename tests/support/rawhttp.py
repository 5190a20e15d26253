"""A raw HTTP/1.1 client for hostile-input tests: sends exactly the bytes given (headers no
client library would send: non-UTF-8, CR in values, odd encodings) and reads the whole reply.

``Connection: close`` framing: the reply is everything until the server closes, with a bounded
timeout, so an empty reply (the connection closed with nothing sent) is seen as ``b""`` rather
than hidden behind a client library's exception.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RawResponse:
    raw: bytes
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def empty(self) -> bool:
        return not self.raw


def request_bytes(
    method: str,
    path: bytes | str,
    headers: Sequence[tuple[bytes | str, bytes | str]],
    body: bytes = b"",
) -> bytes:
    """One request with ``Connection: close`` and a correct Content-Length."""

    def b(x: bytes | str) -> bytes:
        return x if isinstance(x, bytes) else x.encode("utf-8", "surrogateescape")

    lines = [b(method) + b" " + b(path) + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [b(k) + b": " + b(v) for k, v in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_response(raw: bytes) -> RawResponse:
    """Status, headers (lower-cased names) and the de-chunked body of a complete reply."""
    out = RawResponse(raw)
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return out
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    out.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        out.headers[name.strip().lower()] = value.strip()
    if out.headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            try:
                size = int(size_line.split(b";")[0], 16)
            except ValueError:
                break
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        out.body = body
    else:
        out.body = rest
    return out


async def send(port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``data`` to 127.0.0.1:``port`` and read the reply until the server closes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    return parse_response(raw)


def send_sync(port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    """:func:`send` with a blocking socket (for tests without an event loop)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return parse_response(b"".join(chunks))
