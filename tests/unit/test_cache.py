"""The response cache's parts on their own: the memory LRU's bounds, assembling a stream,
replaying an entry."""

from __future__ import annotations

from typing import Any

import orjson

from inference_server.cache import (
    Entry,
    Lookup,
    MemoryStore,
    ResponseCache,
    StreamCollector,
    replay,
    storable,
)
from inference_server.cache_config import CacheSettings
from inference_server.metrics import Metrics, MetricsSettings


def store(**settings: Any) -> MemoryStore:
    return MemoryStore(CacheSettings(**settings), Metrics(MetricsSettings()))


def entry(size: int, expires: float = 1e12) -> Entry:
    return Entry(b"x" * (size - 100), 0.0, expires)


async def test_lru_bounded_by_entries_and_bytes() -> None:
    lru = store(max_entries=2, max_bytes=10_000)
    for key in ("a", "b"):
        await lru.put(key, entry(1000))
    assert await lru.get("a", 0.0) is not None  # a is now the most recently used
    await lru.put("c", entry(1000))
    assert list(lru.entries) == ["a", "c"]
    big = store(max_entries=100, max_bytes=2500)
    for key in ("a", "b", "c"):
        await big.put(key, entry(1000))
    assert list(big.entries) == ["b", "c"]
    assert big.bytes == 2000
    await big.put("c", entry(500))  # replacing keeps the byte count right
    assert big.bytes == 1500
    await big.put("d", entry(3000))  # larger than the whole cache: not kept, nothing evicted
    assert list(big.entries) == ["b", "c"]


async def test_expired_entries_are_dropped_when_met() -> None:
    lru = store()
    await lru.put("a", entry(200, expires=10.0))
    assert await lru.get("a", 9.9) is not None
    assert await lru.get("a", 10.0) is None
    assert not lru.entries
    assert lru.bytes == 0


def test_storable_answers() -> None:
    ok = {"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}
    assert storable(ok)
    assert not storable({"choices": []})
    assert not storable({"choices": [{"message": {"content": "x"}, "finish_reason": None}]})
    assert not storable({**ok, "error": {"message": "in a 200"}})


def chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


async def collect(*chunks: dict[str, Any], limit: int = 1 << 20) -> dict[str, Any] | None:
    settings = CacheSettings(enabled=True, max_entry_bytes=limit)
    cache = ResponseCache(settings, Metrics(MetricsSettings()), store(), 10)
    lookup = Lookup(cache, "k", 60)
    collector = StreamCollector(lookup)
    for c in chunks:
        collector.observe(c)
    await collector.completed({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    got = await cache.store.get("k", 0.0)
    return None if got is None else orjson.loads(got.payload)


async def test_a_stream_with_tool_calls_is_assembled_and_replayed() -> None:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get"}}
    stored = await collect(
        chunk({"role": "assistant"}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        chunk({}, "tool_calls"),
    )
    assert stored is not None
    message = stored["choices"][0]["message"]
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}
    ]
    events = [orjson.loads(e[6:]) for e in replay(stored, {}, include_usage=True)]
    assert events[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == (
        '{"a": 1}'
    )
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_what_a_stream_collector_never_stores() -> None:
    assert await collect(chunk({"content": "a"})) is None  # no finish_reason: maybe truncated
    with_logprobs = chunk({"content": "a"}, "stop")
    with_logprobs["choices"][0]["logprobs"] = {"content": []}
    assert await collect(with_logprobs) is None
    assert await collect(chunk({"audio": {"id": "x"}}, "stop")) is None  # unknown delta field
    two = await collect(chunk({"content": "a"}, "stop"), chunk({"content": "b"}, "length", 1))
    assert two is not None
    assert [c["message"]["content"] for c in two["choices"]] == ["a", "b"]
    assert await collect(chunk({"content": "a" * 300}), chunk({}, "stop"), limit=256) is None


def test_a_stream_longer_than_an_entry_is_dropped_as_it_goes() -> None:
    settings = CacheSettings(enabled=True, max_entry_bytes=256)
    cache = ResponseCache(settings, Metrics(MetricsSettings()), store(), 10)
    collector = StreamCollector(Lookup(cache, "k", 60))
    collector.observe(chunk({"content": "a" * 200}))
    assert collector.choices
    collector.observe(chunk({"content": "a" * 100}))
    assert not collector.ok
    assert not collector.choices  # not held until the stream's end


def test_long_content_is_replayed_in_pieces() -> None:
    completion = {
        "id": "c",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"content": "y" * 9000}, "finish_reason": "stop"}],
    }
    events = [orjson.loads(e[6:]) for e in replay(completion, {}, include_usage=False)]
    pieces = [e["choices"][0]["delta"].get("content") for e in events]
    assert pieces == ["", "y" * 4096, "y" * 4096, "y" * 808, None]
    assert all("usage" not in e for e in events)
