"""A small, allocation-light Server-Sent Events decoder for upstream streams.

Upstreams differ in line endings (LF, CRLF, even bare CR), send comment pings (``:`` lines from
llama.cpp and sse-starlette), split events across TCP reads at arbitrary bytes and sometimes add
``event:`` lines.  This decoder handles all of that and yields each event's ``data`` as bytes, which
``orjson.loads`` takes without a decode step.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable


class SSEDecoder:
    """Incremental SSE parser: feed raw bytes, get complete ``data`` payloads back."""

    __slots__ = ("_buf", "_data", "_held_cr")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []
        self._held_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """Consume ``chunk``; return the data of every event completed by it (often one)."""
        buf = self._buf + chunk if self._buf else chunk
        if self._held_cr:
            buf = b"\r" + buf
            self._held_cr = False
        if b"\r" in buf:
            # A CR at the very end may be the first half of a CRLF split across reads.
            if buf.endswith(b"\r"):
                buf = buf[:-1]
                self._held_cr = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        out: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            # Comments (":"), "event:", "id:" and "retry:" lines carry nothing we forward.
        return out

    def flush(self) -> list[bytes]:
        """At end of stream: return an event left without its closing blank line, if any."""
        out = self.feed(b"\n\n") if (self._buf or self._data) else []
        self._buf = b""
        self._data = []
        return out


async def sse_events(body: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """Every event's ``data`` from an upstream body read as it arrives (e.g.
    ``resp.content.iter_any()``), including an event left without its closing blank line at EOF.

    The one feed-then-flush loop every streaming plugin needs; close it (``aclosing``) when the
    consumer stops early, so the body is not read further.
    """
    decoder = SSEDecoder()
    async for data in body:
        for event in decoder.feed(data):
            yield event
    for event in decoder.flush():
        yield event
