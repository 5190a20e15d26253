"""A hand-rolled OTLP/protobuf encoder for trace export, and an HTTP exporter that uses it.

Why: the SDK's encoder (``opentelemetry.exporter.otlp.proto.common.trace_encoder``) builds a
protobuf object per span, per attribute and per value, then serializes the tree; it also hashes
each span's ``Resource`` (a JSON dump of its attributes) to group spans.  That costs ~23 µs per
span, spent on the BatchSpanProcessor's thread *holding the GIL*, i.e. stolen from the event loop.
Writing the wire format directly, with the per-resource and per-scope parts encoded once, costs a
small fraction of that.

The output decodes to exactly the message the SDK encoder builds (same grouping and order, same
fields, same defaults skipped); byte identity is not a goal.  Known SDK choices this copies on
purpose: span and link ``flags`` carry only the "has is_remote"/"is_remote" bits (not the W3C
trace flags), links carry no ``trace_state``, the resource carries no dropped-attributes count and
the scope neither.  Anything unexpected (a value type the SDK would log and drop, an ``int``
outside int64, a string that is not valid UTF-8) raises, so that :class:`FastOTLPSpanExporter`
re-encodes that batch with the SDK: the rare odd batch costs the old price, none is lost.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import (
    encode_spans as sdk_encode_spans,
)
from opentelemetry.exporter.otlp.proto.http._common import (
    RequestPayloadTooLargeError,
    _is_request_too_large,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import Link, SpanKind, StatusCode
from opentelemetry.trace.span import DEFAULT_TRACE_STATE
from opentelemetry.util.types import Attributes

__all__ = ["FastOTLPSpanExporter", "encode_spans"]

_logger = logging.getLogger(__name__)


class UnencodableError(ValueError):
    """A value the fast encoder does not handle exactly like the SDK: re-encode with the SDK."""


# ---------------------------------------------------------------------------------------------
# Varints.  Values below 2**12 (nearly every attribute and span length) come from a table: a
# lookup is several times cheaper than the loop, and the table is built once (~0.15 MB).

_TABLE_SIZE: Final = 1 << 12
_VARINTS: Final[tuple[bytes, ...]] = tuple(
    bytes((n,)) if n < 0x80 else bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(_TABLE_SIZE)
)
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_UINT32_MAX: Final = (1 << 32) - 1
_UINT64_MASK: Final = (1 << 64) - 1


def _varint(n: int) -> bytes:
    """The base-128 varint of a non-negative ``n`` (callers guarantee the sign)."""
    if n < _TABLE_SIZE:
        return _VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _uint32(n: int) -> bytes:
    """A uint32 field value; out of range raises, as protobuf would."""
    if not 0 <= n <= _UINT32_MAX:
        raise UnencodableError(f"uint32 out of range: {n}")
    return _varint(n)


# ---------------------------------------------------------------------------------------------
# Tags: (field number << 3) | wire type, pre-encoded.  Wire types: 0 varint, 1 fixed64,
# 2 length-delimited, 5 fixed32.

# AnyValue
_STRING_VALUE: Final = b"\x0a"
_BOOL_TRUE: Final = b"\x10\x01"
_BOOL_FALSE: Final = b"\x10\x00"
_INT_VALUE: Final = b"\x18"
_DOUBLE_VALUE: Final = b"\x21"
_ARRAY_VALUE: Final = b"\x2a"
_KVLIST_VALUE: Final = b"\x32"
_BYTES_VALUE: Final = b"\x3a"
# KeyValue.key, KeyValue.value, ArrayValue.values, KeyValueList.values: all field 1 or 2, LEN
_F1_LEN: Final = b"\x0a"
_F2_LEN: Final = b"\x12"
_F3_LEN: Final = b"\x1a"
# Span
_SPAN_TRACE_ID: Final = b"\x0a\x10"  # + 16 bytes
_SPAN_SPAN_ID: Final = b"\x12\x08"  # + 8 bytes
_SPAN_TRACE_STATE: Final = b"\x1a"
_SPAN_PARENT_ID: Final = b"\x22\x08"  # + 8 bytes
_SPAN_NAME: Final = b"\x2a"
_SPAN_START: Final = 0x39  # fixed64
_SPAN_END: Final = 0x41  # fixed64
_SPAN_ATTRIBUTE: Final = b"\x4a"
_SPAN_DROPPED_ATTRIBUTES: Final = b"\x50"
_SPAN_EVENT: Final = b"\x5a"
_SPAN_DROPPED_EVENTS: Final = b"\x60"
_SPAN_LINK: Final = b"\x6a"
_SPAN_DROPPED_LINKS: Final = b"\x70"
_SPAN_STATUS: Final = b"\x7a"
# Span.flags (field 16, fixed32) as the SDK sets it: CONTEXT_HAS_IS_REMOTE (0x100), plus
# CONTEXT_IS_REMOTE (0x200) when the parent is remote.  Link.flags (field 6) likewise.
_SPAN_FLAGS_LOCAL: Final = b"\x85\x01" + struct.pack("<I", 0x100)
_SPAN_FLAGS_REMOTE: Final = b"\x85\x01" + struct.pack("<I", 0x300)
_LINK_FLAGS_LOCAL: Final = b"\x35" + struct.pack("<I", 0x100)
_LINK_FLAGS_REMOTE: Final = b"\x35" + struct.pack("<I", 0x300)
# Event
_EVENT_TIME: Final = b"\x09"  # fixed64
# Link
_LINK_TRACE_ID: Final = b"\x0a\x10"
_LINK_SPAN_ID: Final = b"\x12\x08"
_LINK_ATTRIBUTE: Final = b"\x22"
_LINK_DROPPED_ATTRIBUTES: Final = b"\x28"

_pack_double: Final[Callable[[float], bytes]] = struct.Struct("<d").pack
_pack_fixed64: Final[Callable[[int], bytes]] = struct.Struct("<Q").pack
_pack_times: Final[Callable[[int, int, int, int], bytes]] = struct.Struct("<BQBQ").pack

#: SDK SpanKind → the encoded ``kind`` field (proto enum = SDK value + 1, as the SDK maps it).
#: Keyed by ``id()``: members are singletons, and ``Enum.__hash__`` is Python code.
_KIND: Final[dict[int, bytes]] = {
    id(kind): b"\x30" + _varint(proto)
    for kind, proto in (
        (SpanKind.INTERNAL, 1),
        (SpanKind.SERVER, 2),
        (SpanKind.CLIENT, 3),
        (SpanKind.PRODUCER, 4),
        (SpanKind.CONSUMER, 5),
    )
}

#: The whole ``status`` field for the message-less statuses (nearly all of them).  The SDK
#: always sets ``status``, so even UNSET is an (empty) present sub-message.
_STATUS: Final[dict[int, bytes]] = {
    id(StatusCode.UNSET): _SPAN_STATUS + b"\x00",
    id(StatusCode.OK): _SPAN_STATUS + b"\x02\x18\x01",
    id(StatusCode.ERROR): _SPAN_STATUS + b"\x02\x18\x02",
}


def _len_field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field."""
    n = len(body)
    return tag + (_VARINTS[n] if n < _TABLE_SIZE else _varint(n)) + body


def _string_field(tag: bytes, value: str) -> bytes:
    """A string field; ``str.encode`` raises on lone surrogates, like protobuf."""
    data = value.encode()
    n = len(data)
    return tag + (_VARINTS[n] if n < _TABLE_SIZE else _varint(n)) + data


# ---------------------------------------------------------------------------------------------
# Attributes: most of the work.  A ``KeyValue`` field is appended to the output as a few pieces
# (tag, length, cached key prefix, value head, value bytes) with lengths computed arithmetically,
# so no intermediate bytes are built per nesting level and the span is joined once.
#
# What repeats is cached, each cache bounded (cleared when full, so high cardinality costs a
# refill, never unbounded memory): a key's prefix (``KeyValue.key`` field + ``KeyValue.value``
# tag), and for short string values the whole field after its tag (method, route, model, system:
# most string attributes take a few values).  Only exact ``str`` values are pair-cached: ``1``,
# ``True`` and ``1.0`` are equal dict keys, strings of equal value encode identically.

_KEY_CACHE_MAX: Final = 4096
_key_cache: dict[str, tuple[bytes, int]] = {}
_PAIR_CACHE_MAX: Final = 4096
_PAIR_VALUE_MAX: Final = 128  # bytes; longer strings (URLs, prompts) rarely repeat
_pair_cache: dict[tuple[str, str], bytes] = {}

#: An ``AnyValue``'s length + ``AnyValue.string_value`` tag + length, for strings < 126 bytes.
_SMALL_STRING_HEAD: Final = tuple(bytes((n + 2, 0x0A, n)) for n in range(126))
#: ``KeyValue.value`` length + ``AnyValue.int_value`` tag, by varint size (1-10 bytes).
_INT_HEAD: Final = tuple(bytes((k + 1, 0x18)) for k in range(11))
_TRUE_VALUE: Final = b"\x02" + _BOOL_TRUE
_FALSE_VALUE: Final = b"\x02" + _BOOL_FALSE
_DOUBLE_HEAD: Final = b"\x09" + _DOUBLE_VALUE


def _key_prefix(key: str) -> tuple[bytes, int]:
    """``KeyValue.key`` (skipped when empty: the proto3 default) + the ``value`` tag, cached."""
    cached = _key_cache.get(key)
    if cached is None:
        prefix = (_string_field(_F1_LEN, key) if key else b"") + _F2_LEN
        cached = (prefix, len(prefix))
        if len(_key_cache) >= _KEY_CACHE_MAX:
            _key_cache.clear()
        _key_cache[key] = cached
    return cached


def _string_pair(key: str, value: str) -> bytes:
    """A ``KeyValue`` with a string value, without its tag (length + body); cached if short."""
    prefix, _ = _key_prefix(key)
    data = value.encode()  # raises on lone surrogates, as protobuf does
    n = len(data)
    value_field = _varint(1 + len(_varint(n)) + n) + _STRING_VALUE + _varint(n) + data
    field = _varint(len(prefix) + len(value_field)) + prefix + value_field
    if n <= _PAIR_VALUE_MAX:
        if len(_pair_cache) >= _PAIR_CACHE_MAX:
            _pair_cache.clear()
        _pair_cache[key, value] = field
    return field


def _put_attributes(out: list[bytes], tag: bytes, items: Iterable[tuple[str, Any]]) -> None:
    """Append the repeated ``KeyValue`` fields of ``items`` under ``tag`` to ``out``.

    The common scalar types are special-cased (exact types only: subclasses take the general
    path, as do the ``Sequence``/``Mapping`` checks in the SDK's order) and everything else goes
    through :func:`_any_value`.  The ``value`` is always present, as the SDK always sets it.
    """
    varints = _VARINTS
    table_size = _TABLE_SIZE
    key_cache = _key_cache
    pair_cache = _pair_cache
    for key, value in items:
        cls = value.__class__
        if cls is str:
            field = pair_cache.get((key, value))
            out += (tag, _string_pair(key, value) if field is None else field)
            continue
        cached = key_cache.get(key)
        prefix, prefix_len = cached if cached is not None else _key_prefix(key)
        if cls is int:
            number = varints[value] if 0 <= value < table_size else _int64(value)
            total = prefix_len + 2 + len(number)
            length = varints[total] if total < table_size else _varint(total)
            out += (tag, length, prefix, _INT_HEAD[len(number)], number)
            continue
        if cls is bool:
            total = prefix_len + 3
            length = varints[total] if total < table_size else _varint(total)
            out += (tag, length, prefix, _TRUE_VALUE if value else _FALSE_VALUE)
            continue
        if cls is float:
            total = prefix_len + 10
            length = varints[total] if total < table_size else _varint(total)
            out += (tag, length, prefix, _DOUBLE_HEAD, _pack_double(value))
            continue
        body = _any_value(value)
        n = len(body)
        head = varints[n] if n < table_size else _varint(n)
        total = prefix_len + len(head) + n
        length = varints[total] if total < table_size else _varint(total)
        out += (tag, length, prefix, head, body)


def _items(attributes: Attributes) -> Iterable[tuple[str, Any]]:
    """``attributes.items()``, straight from a ``BoundedAttributes``' dict when there is one.

    Iterating a ``BoundedAttributes`` goes through the ``Mapping`` ABC in Python (an
    ``__iter__`` and a ``__getitem__`` call per key); its ``_dict`` iterates in C, in the same
    order.  If a future SDK renames it, the public path is used.
    """
    if attributes.__class__ is BoundedAttributes:
        raw = getattr(attributes, "_dict", None)
        if raw.__class__ is dict:
            return raw.items()
    if not attributes:
        return ()
    return attributes.items()


def _put_values(out: list[bytes], values: Iterable[Any]) -> None:
    """Append the ``ArrayValue.values`` fields of ``values`` to ``out`` (scalars special-cased,
    as in :func:`_put_attributes`: an array element is a length-prefixed ``AnyValue`` too)."""
    varints = _VARINTS
    table_size = _TABLE_SIZE
    for value in values:
        cls = value.__class__
        if cls is str:
            data = value.encode()
            n = len(data)
            if n < 126:
                out += (_F1_LEN, _SMALL_STRING_HEAD[n], data)
                continue
        if cls is int:
            number = varints[value] if 0 <= value < table_size else _int64(value)
            out += (_F1_LEN, _INT_HEAD[len(number)], number)
            continue
        if cls is bool:
            out += (_F1_LEN, _TRUE_VALUE if value else _FALSE_VALUE)
            continue
        if cls is float:
            out += (_F1_LEN, _DOUBLE_HEAD, _pack_double(value))
            continue
        body = _any_value(value)
        n = len(body)
        out += (_F1_LEN, varints[n] if n < table_size else _varint(n), body)


def _any_value(value: object) -> bytes:
    """The body of an ``AnyValue``, dispatching in the SDK's order (``_encode_value``).

    Every oneof member is emitted even when it holds its default (``False``, ``0``, ``""``):
    oneof fields have presence.  ``None`` is an empty ``AnyValue``.  Lists and tuples skip the
    ``Sequence`` ABC check (slow), which they would pass anyway.
    """
    out: list[bytes] = []
    if value.__class__ is tuple or value.__class__ is list:
        _put_values(out, value)
        return _len_field(_ARRAY_VALUE, b"".join(out))
    if value is None:
        return b""
    if isinstance(value, bool):
        return _BOOL_TRUE if value else _BOOL_FALSE
    if isinstance(value, str):
        return _string_field(_STRING_VALUE, value)
    if isinstance(value, int):
        return _INT_VALUE + _int64(value)
    if isinstance(value, float):
        return _DOUBLE_VALUE + _pack_double(value)
    if isinstance(value, bytes):
        return _len_field(_BYTES_VALUE, value)
    if isinstance(value, Sequence):
        _put_values(out, value)
        return _len_field(_ARRAY_VALUE, b"".join(out))
    if isinstance(value, Mapping):
        _put_attributes(out, _F1_LEN, [(str(k), v) for k, v in value.items()])
        return _len_field(_KVLIST_VALUE, b"".join(out))
    raise UnencodableError(f"invalid attribute value type {type(value)}")


def _attributes(tag: bytes, attributes: Attributes) -> list[bytes]:
    """The repeated ``KeyValue`` fields of ``attributes`` under ``tag``, as pieces."""
    out: list[bytes] = []
    _put_attributes(out, tag, _items(attributes))
    return out


def _int64(value: int) -> bytes:
    """An int64 varint (two's complement, 10 bytes when negative); out of range raises."""
    if value >= 0:
        if value < _TABLE_SIZE:
            return _VARINTS[value]
        if value > _INT64_MAX:
            raise UnencodableError(f"int64 out of range: {value}")
        return _varint(value)
    if value < _INT64_MIN:
        raise UnencodableError(f"int64 out of range: {value}")
    return _varint(value & _UINT64_MASK)


# ---------------------------------------------------------------------------------------------
# Resource and scope headers, encoded once per object.  Keyed by identity (the object is kept in
# the entry so its id cannot be reused while cached); both are immutable once built.

_HEADER_CACHE_MAX: Final = 256
_resource_cache: dict[int, tuple[Resource, bytes, bytes]] = {}
_scope_cache: dict[int, tuple[InstrumentationScope | None, bytes, bytes]] = {}


def _resource_parts(resource: Resource) -> tuple[bytes, bytes]:
    """``ResourceSpans.resource`` (always present) and ``ResourceSpans.schema_url`` fields."""
    cached = _resource_cache.get(id(resource))
    if cached is not None and cached[0] is resource:
        return cached[1], cached[2]
    body = b"".join(_attributes(_F1_LEN, resource.attributes))
    head = _len_field(_F1_LEN, body)
    schema_url = resource.schema_url
    tail = _string_field(_F3_LEN, schema_url) if schema_url else b""
    if len(_resource_cache) >= _HEADER_CACHE_MAX:
        _resource_cache.clear()
    _resource_cache[id(resource)] = (resource, head, tail)
    return head, tail


def _scope_parts(scope: InstrumentationScope | None) -> tuple[bytes, bytes]:
    """``ScopeSpans.scope`` (always present, empty for no scope) and ``ScopeSpans.schema_url``."""
    cached = _scope_cache.get(id(scope))
    if cached is not None and cached[0] is scope:
        return cached[1], cached[2]
    if scope is None:
        head, tail = _len_field(_F1_LEN, b""), b""
    else:
        parts = []
        if scope.name:
            parts.append(_string_field(_F1_LEN, scope.name))
        if scope.version:
            parts.append(_string_field(_F2_LEN, scope.version))
        parts.extend(_attributes(_F3_LEN, scope.attributes))
        head = _len_field(_F1_LEN, b"".join(parts))
        tail = _string_field(_F3_LEN, scope.schema_url) if scope.schema_url else b""
    if len(_scope_cache) >= _HEADER_CACHE_MAX:
        _scope_cache.clear()
    _scope_cache[id(scope)] = (scope, head, tail)
    return head, tail


# ---------------------------------------------------------------------------------------------
# Spans.  Span names are few (a route, an operation and a model), so their fields are cached too.

_NAME_CACHE_MAX: Final = 4096
_name_cache: dict[str, bytes] = {}


def _span_name(name: str) -> bytes:
    """The ``Span.name`` field, cached (bounded like the key cache)."""
    encoded = _string_field(_SPAN_NAME, name)
    if len(_name_cache) >= _NAME_CACHE_MAX:
        _name_cache.clear()
    _name_cache[name] = encoded
    return encoded


def _span(span: ReadableSpan) -> bytes:
    """One ``ScopeSpans.spans`` field (tag, length, ``Span``).

    Where the public ``ReadableSpan`` API copies (``attributes`` wraps a fresh MappingProxyType
    iterated in Python; ``events``/``links`` copy a ``BoundedList`` under its lock through a
    Python ``__iter__``, ~0.4 µs each even when empty), the SDK's own containers are read
    directly: an exported span has ended, so nothing mutates them any more.  Each such access
    checks the exact class and falls back to the public API, so an SDK that changes them is
    only slower, never wrong.
    """
    context = span.get_span_context()
    if context is None:
        raise UnencodableError("span without a context")
    trace_id, span_id, _, _, trace_state, _ = context  # a SpanContext is a tuple
    parts = [
        _SPAN_TRACE_ID,
        trace_id.to_bytes(16, "big"),
        _SPAN_SPAN_ID,
        span_id.to_bytes(8, "big"),
    ]
    if trace_state is not DEFAULT_TRACE_STATE and trace_state:
        text = ",".join([f"{key}={value}" for key, value in trace_state.items()])
        if text:
            parts.append(_string_field(_SPAN_TRACE_STATE, text))
    parent = span.parent
    if parent is not None:  # a SpanContext is a non-empty tuple: always truthy for the SDK
        parts += (_SPAN_PARENT_ID, parent[1].to_bytes(8, "big"))
    name = span.name
    if name:
        encoded_name = _name_cache.get(name)
        parts.append(_span_name(name) if encoded_name is None else encoded_name)
    parts.append(_KIND[id(span.kind)])
    start, end = span.start_time, span.end_time
    if start and end:
        parts.append(_pack_times(_SPAN_START, start, _SPAN_END, end))
    else:  # not ended (or a zero time): each field on its own, defaults skipped
        if start:
            parts.append(bytes((_SPAN_START,)) + _pack_fixed64(start))
        if end:
            parts.append(bytes((_SPAN_END,)) + _pack_fixed64(end))

    attributes = getattr(span, "_attributes", None)
    if attributes.__class__ is BoundedAttributes:
        dropped = attributes.dropped
    else:
        attributes, dropped = span.attributes, span.dropped_attributes
    _put_attributes(parts, _SPAN_ATTRIBUTE, _items(attributes))
    if dropped:
        parts.append(_SPAN_DROPPED_ATTRIBUTES + _uint32(dropped))

    events, dropped = _bounded(span, "events")
    for event in events:
        parts.append(_event(event))
    if dropped:
        parts.append(_SPAN_DROPPED_EVENTS + _uint32(dropped))

    links, dropped = _bounded(span, "links")
    for link in links:
        parts.append(_link(link))
    if dropped:
        parts.append(_SPAN_DROPPED_LINKS + _uint32(dropped))

    status = span.status
    description = status.description
    if description:
        body = _string_field(_F2_LEN, description)
        code = status.status_code.value
        parts.append(_len_field(_SPAN_STATUS, (body + b"\x18" + _varint(code)) if code else body))
    else:
        parts.append(_STATUS[id(status.status_code)])
    parts.append(_SPAN_FLAGS_REMOTE if parent is not None and parent[2] else _SPAN_FLAGS_LOCAL)
    body = b"".join(parts)
    n = len(body)
    return _F2_LEN + (_VARINTS[n] if n < _TABLE_SIZE else _varint(n)) + body


def _bounded(span: ReadableSpan, name: str) -> tuple[Iterable[Any], int]:
    """A span's ``events`` or ``links`` and their dropped count.  The SDK keeps them in a
    ``BoundedList`` whose public property copies it on every access; read its deque directly
    when it is one, else go through the public API (slower, never wrong)."""
    raw = getattr(span, "_" + name, None)
    if raw.__class__ is BoundedList and (deque := getattr(raw, "_dq", None)) is not None:
        return deque, raw.dropped
    return getattr(span, name), getattr(span, "dropped_" + name)


def _event(event: Event) -> bytes:
    """One ``Span.events`` field."""
    parts = [_EVENT_TIME + _pack_fixed64(event.timestamp)] if event.timestamp else []
    if event.name:
        parts.append(_string_field(_F2_LEN, event.name))
    _put_attributes(parts, _F3_LEN, _items(event.attributes))
    if dropped := event.dropped_attributes:
        parts.append(b"\x20" + _uint32(dropped))
    return _len_field(_SPAN_EVENT, b"".join(parts))


def _link(link: Link) -> bytes:
    """One ``Span.links`` field.  No ``trace_state``: the SDK encoder does not set it."""
    trace_id, span_id, is_remote, _, _, _ = link.context
    parts = [
        _LINK_TRACE_ID,
        trace_id.to_bytes(16, "big"),
        _LINK_SPAN_ID,
        span_id.to_bytes(8, "big"),
    ]
    _put_attributes(parts, _LINK_ATTRIBUTE, _items(link.attributes))
    if dropped := link.dropped_attributes:
        parts.append(_LINK_DROPPED_ATTRIBUTES + _uint32(dropped))
    parts.append(_LINK_FLAGS_REMOTE if is_remote else _LINK_FLAGS_LOCAL)
    return _len_field(_SPAN_LINK, b"".join(parts))


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """A serialized ``ExportTraceServiceRequest`` for ``spans``, grouped as the SDK groups them.

    The SDK keys a dict by resource, then by scope (``instrumentation_scope or None``), in first
    appearance order, so *equal* resources (or scopes) from different objects share a group, and
    each group's header comes from its first object.  Hashing a ``Resource`` dumps its attributes
    to JSON, so spans are first mapped by object identity and only each new (resource, scope)
    identity pair goes through the SDK's equality-keyed dicts.

    Raises :class:`UnencodableError` (or ``UnicodeEncodeError``, ``KeyError``, ...) where the SDK
    would drop or fail on something; :class:`FastOTLPSpanExporter` then uses the SDK encoder.
    """
    by_identity: dict[tuple[int, int], list[bytes]] = {}
    groups: dict[Resource, dict[InstrumentationScope | None, list[bytes]]] = {}
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope or None
        identity = (id(resource), id(scope))
        encoded = by_identity.get(identity)
        if encoded is None:
            scopes = groups.setdefault(resource, {})
            encoded = by_identity[identity] = scopes.setdefault(scope, [])
        encoded.append(_span(span))

    out = []
    for resource, scopes in groups.items():
        resource_head, resource_tail = _resource_parts(resource)
        resource_body = [resource_head]
        for scope, encoded in scopes.items():
            scope_head, scope_tail = _scope_parts(scope)
            resource_body.append(_len_field(_F2_LEN, b"".join([scope_head, *encoded, scope_tail])))
        resource_body.append(resource_tail)
        out.append(_len_field(_F1_LEN, b"".join(resource_body)))
    return b"".join(out)


def _serialize(spans: Sequence[ReadableSpan]) -> bytes:
    """``encode_spans``, or the SDK's encoding of the batch if the fast path cannot encode it."""
    try:
        return encode_spans(spans)
    except Exception as error:  # noqa: BLE001 - any failure: the SDK decides, the batch survives
        _logger.debug("fast OTLP encoding failed (%r), using the SDK encoder", error)
        data: bytes = sdk_encode_spans(spans).SerializePartialToString()
        return data


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/HTTP span exporter with :func:`encode_spans` in place of the SDK encoder.

    ``export`` is the parent's (opentelemetry-exporter-otlp-proto-http 1.45), with only the
    encoding call changed: the parent calls its module's ``encode_spans`` inline, so there is no
    narrower hook to override.
    """

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encode ``spans`` (fast path, SDK fallback) and send them; the parent's result rules."""
        if self._shutdown:
            _logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE

        with self._metrics.export_operation(len(spans)) as result:
            try:
                serialized_data = _serialize(spans)
            except Exception as error:  # noqa: BLE001 - as the parent: a failed export, logged
                _logger.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE

            if _is_request_too_large(serialized_data, self._max_request_size):
                _logger.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size "
                    "%d bytes.",
                    len(serialized_data),
                    self._max_request_size,
                )
                result.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(serialized_data)} bytes exceeds "
                    f"max_request_size {self._max_request_size} bytes."
                )
                return SpanExportResult.FAILURE

            export_result = self._client.export(serialized_data)
            if not export_result.success:
                result.error = export_result.error
                result.error_attrs = (
                    {HTTP_RESPONSE_STATUS_CODE: export_result.status_code}
                    if export_result.status_code is not None
                    else None
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
