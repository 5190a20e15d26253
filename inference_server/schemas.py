"""Request validation with marshmallow: only what the gateway acts on, the rest passes through.

Schema instances are built once at import (building one per request costs ~3x; measured in
shared/reference/style-python.md).  ``unknown=INCLUDE`` everywhere, because OpenAI keeps adding
request fields and a gateway that rejects them breaks real clients.  Errors are flattened into
one readable message plus a dotted ``param`` path (``messages.0.role``), always a 400.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from inference_server.errors import InvalidRequest

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class _Base(Schema):
    class Meta:
        unknown = INCLUDE


class StringOrList(fields.Field[Any]):
    """``stop``: a string, or a list of at most 4 strings."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if not 1 <= len(value) <= 4:
                raise ValidationError("must be a string or a list of 1 to 4 strings")
            return value
        raise ValidationError("must be a string or a list of 1 to 4 strings")


_ROLE_ERROR = f"Must be one of: {', '.join(ROLES)}."
_MISSING = "Missing data for required field."


class MessageField(fields.Field[dict[str, Any]]):
    """One chat message: a valid role, content of the right shape for it, optional strings.

    One field rather than a nested Schema per message: the same rules and error paths
    (``messages.<i>.<key>``) at a sixth of the cost, which matters for long conversations.
    Unknown keys (``tool_calls``, ``audio``, vendor fields) pass through untouched.
    """

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, dict):
            raise ValidationError("Must be an object with a 'role'.")
        errors: dict[str, list[str]] = {}
        role = value.get("role")
        if role is None:
            errors["role"] = [_MISSING]
        elif role not in ROLES:
            errors["role"] = [_ROLE_ERROR]
        content = value.get("content")
        if content is None:
            if role != "assistant":
                errors.setdefault("content", [f"a '{role}' message needs content"])
            elif not value.get("tool_calls") and not value.get("function_call"):
                errors["content"] = ["an assistant message needs content or tool_calls"]
        elif not isinstance(content, str):
            problem = _content_problem(content)
            if problem:
                errors["content"] = [problem]
        for key in ("name", "tool_call_id"):
            item = value.get(key)
            if item is not None and not isinstance(item, str):
                errors[key] = ["Not a valid string."]
        if role == "tool" and not value.get("tool_call_id"):
            errors.setdefault("tool_call_id", ["a 'tool' message needs tool_call_id"])
        if errors:
            raise ValidationError(errors)
        return value


def _content_problem(content: Any) -> str | None:
    """Why non-string ``content`` is invalid: it must be a non-empty list of typed parts."""
    if not isinstance(content, list):
        return "must be a string or a list of content parts"
    if not content:
        return "content parts must not be empty"
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return f"content part {i} must be an object with a 'type'"
    return None


class StreamOptionsSchema(_Base):
    include_usage = fields.Boolean(allow_none=True)


class ChatCompletionSchema(_Base):
    model = fields.String(allow_none=True)
    messages = fields.List(MessageField(), required=True)
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2))
    top_p = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    frequency_penalty = fields.Float(allow_none=True, validate=validate.Range(-2, 2))
    presence_penalty = fields.Float(allow_none=True, validate=validate.Range(-2, 2))
    max_tokens = fields.Integer(allow_none=True, strict=True, validate=validate.Range(min=1))
    max_completion_tokens = fields.Integer(
        allow_none=True, strict=True, validate=validate.Range(min=1)
    )
    n = fields.Integer(allow_none=True, strict=True, validate=validate.Range(1, 128))
    stop = StringOrList(allow_none=True)
    stream = fields.Boolean(allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    seed = fields.Integer(allow_none=True, strict=True)


CHAT_SCHEMA = ChatCompletionSchema()


def _first_error(messages: Any, path: list[str]) -> tuple[list[str], str]:
    """Depth-first: the path and text of the first leaf message of a marshmallow error dict."""
    if isinstance(messages, Mapping):
        # Field errors before schema-level ones so `param` is as specific as possible.
        keys = sorted(messages, key=lambda k: (k == "_schema", str(k)))
        for key in keys:
            sub_path = path if key == "_schema" else [*path, str(key)]
            return _first_error(messages[key], sub_path)
    if isinstance(messages, list) and messages:
        if all(isinstance(m, str) for m in messages):
            return path, "; ".join(messages)
        return _first_error(messages[0], path)
    return path, str(messages)


def validate_chat(body: Any) -> dict[str, Any]:
    """Validate a chat.completions body; return it (unknown fields kept) or raise a 400."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object", code="INVALID_REQUEST")
    messages = body.get("messages")
    if isinstance(messages, list) and not messages:
        raise InvalidRequest(
            "Messages array cannot be empty", code="EMPTY_MESSAGES", param="messages"
        )
    fast = fast_validate(body)
    if fast is not None:
        return fast
    return validate_with_schema(body)


# --- the fast path ------------------------------------------------------------------------------
# Most requests are plain: string messages with ordinary roles and well-typed parameters.  For
# them, walking the marshmallow schema is most of the gateway's validation cost (~25 µs of ~35),
# so the same rules are checked here directly.  It only ever *accepts*: anything unusual (a
# wrong type, a value out of range, a tool message, content parts) returns None and the schema
# decides, so every error message still comes from one place.  A property test holds the two to
# the same answers: whenever the fast path accepts, the schema returns the same dict.

_Range = tuple[float | None, float | None]


def _ranges(kind: type[fields.Number[Any]]) -> dict[str, _Range]:
    """(min, max) of every ``kind`` field of the schema, read from its ``Range`` validator, so
    the bounds are written once (in the schema)."""
    out: dict[str, _Range] = {}
    for name, field in CHAT_SCHEMA.fields.items():
        if type(field) is kind:
            bound = next((v for v in field.validators if isinstance(v, validate.Range)), None)
            if bound is None:
                out[name] = (None, None)
            else:
                if not (bound.min_inclusive and bound.max_inclusive):
                    raise TypeError(f"{name}: fast_validate checks inclusive ranges only")
                out[name] = (bound.min, bound.max)
    return out


_FLOAT_RANGES: Final = _ranges(fields.Float)
_INT_RANGES: Final = _ranges(fields.Integer)
#: Roles whose message is valid with string content whatever else it holds (not "tool": it
#: needs ``tool_call_id``; not "function": legacy, left to the schema).
_PLAIN_ROLES = frozenset({"system", "developer", "user", "assistant"})


def _plain_message(message: Any) -> bool:
    if type(message) is not dict:
        return False
    if type(message.get("content")) is not str or message.get("role") not in _PLAIN_ROLES:
        return False
    if len(message) > 2:
        for key in ("name", "tool_call_id"):
            value = message.get(key)
            if value is not None and type(value) is not str:
                return False
    return True


def _within(value: float, bounds: _Range) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def fast_validate(body: dict[str, Any]) -> dict[str, Any] | None:
    """The validated body for a plain request, or None to let the schema decide."""
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        return None
    for message in messages:
        if not _plain_message(message):
            return None
    out: dict[str, Any] = {}
    for key, value in body.items():
        if value is None:  # null means "not given" (validate_with_schema drops them too)
            continue
        if key in _FLOAT_RANGES:
            kind = type(value)
            if (kind is not float and kind is not int) or not _within(value, _FLOAT_RANGES[key]):
                return None
            value = float(value)
        elif key in _INT_RANGES:
            if type(value) is not int or not _within(value, _INT_RANGES[key]):
                return None
        elif key == "model":
            if type(value) is not str:
                return None
        elif key == "stream":
            if type(value) is not bool:
                return None
        elif key == "stop":
            if type(value) is not str and not (
                type(value) is list and 1 <= len(value) <= 4 and all(type(v) is str for v in value)
            ):
                return None
        elif key == "stream_options":
            if type(value) is not dict or type(value.get("include_usage", False)) is not bool:
                return None
            value = dict(value)
        out[key] = value
    return out


def validate_with_schema(body: dict[str, Any]) -> dict[str, Any]:
    """The reference validation (marshmallow): every rule, and every error message."""
    try:
        data: dict[str, Any] = CHAT_SCHEMA.load(body)
    except ValidationError as exc:
        path, text = _first_error(exc.messages, [])
        param = ".".join(path) or None
        if text == "Missing data for required field.":
            raise InvalidRequest(
                f"Missing required parameter: '{param}'", code="MISSING_PARAMETER", param=param
            ) from exc
        raise InvalidRequest(
            f"Invalid value for '{param}': {text}" if param else text,
            code="INVALID_PARAMETER",
            param=param,
        ) from exc
    # A null is "not given" for every optional OpenAI field: drop the ones we validated as null
    # so upstreams that reject nulls (several local servers do) never see them.
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    return data
