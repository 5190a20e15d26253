"""The upstream SSE decoder copes with every framing seen in the wild."""

from __future__ import annotations

from inference_server.providers.sse import SSEDecoder


def _all(chunks: list[bytes]) -> list[bytes]:
    d = SSEDecoder()
    out: list[bytes] = []
    for c in chunks:
        out.extend(d.feed(c))
    return out + d.flush()


def test_lf_crlf_and_cr_line_endings() -> None:
    for sep in (b"\n", b"\r\n", b"\r"):
        stream = b"data: 1" + sep + sep + b"data: 2" + sep + sep
        assert _all([stream]) == [b"1", b"2"]


def test_events_split_at_every_byte() -> None:
    stream = b'data: {"a": 1}\r\n\r\n: ping\r\n\r\ndata: [DONE]\r\n\r\n'
    assert _all([bytes([b]) for b in stream]) == [b'{"a": 1}', b"[DONE]"]


def test_comments_event_lines_and_multiline_data() -> None:
    stream = b": ping\n\nevent: message\nid: 3\ndata: a\ndata: b\n\ndata:no-space\n\n"
    assert _all([stream]) == [b"a\nb", b"no-space"]


def test_event_without_trailing_blank_line_is_flushed() -> None:
    assert _all([b"data: last"]) == [b"last"]
