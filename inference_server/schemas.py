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
#: Longest accepted model name.  A constant, not a setting: real ids are far shorter (the
#: longest OpenAI fine-tune ids are ~80 characters) and the name is echoed into headers and logs.
MAX_MODEL_NAME_CHARS: Final = 256


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


class StrictBoolean(fields.Boolean):
    """A JSON ``true``/``false`` only: marshmallow's Boolean also takes ``"yes"``, ``1``, ``"on"``,
    which would turn ``"stream": "no"`` into a stream the client did not ask for."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if type(value) is not bool:
            raise self.make_error("invalid", input=value)
        return value


def valid_model_name(value: Any) -> bool:
    """A model name the gateway may route on and echo (headers, logs, metrics): a string of 1 to
    :data:`MAX_MODEL_NAME_CHARS` printable characters, so no CR, LF, NUL, C0/C1 control, DEL or
    Unicode line separator can ever reach a response header or forge a log line."""
    return type(value) is str and 0 < len(value) <= MAX_MODEL_NAME_CHARS and value.isprintable()


_MODEL_ERROR = (
    f"must be a string of 1 to {MAX_MODEL_NAME_CHARS} printable characters (no control characters)"
)


class ModelName(fields.String):
    """``model``: see :func:`valid_model_name` (the fast path applies the same function)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not valid_model_name(value):
            raise ValidationError(_MODEL_ERROR)
        return value


_ROLE_ERROR = f"Must be one of: {', '.join(ROLES)}."
_MISSING = "Missing data for required field."


def message_problems(value: Any) -> dict[str, list[str]] | list[str] | None:
    """What is wrong with one chat message (marshmallow's error shape), or None.

    A valid role, content of the right shape for it, optional strings.  Unknown keys
    (``tool_calls``, ``audio``, vendor fields) pass through untouched.
    """
    if not isinstance(value, dict):
        return ["Must be an object with a 'role'."]
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
    return errors or None


class MessagesField(fields.Field[list[Any]]):
    """``messages``: a list of chat messages, each checked by :func:`message_problems`.

    One field with one loop rather than ``List(Nested(...))``: the same rules and error paths
    (``messages.<i>.<key>``) at a fraction of the cost (a nested Schema per message cost 6x,
    ``List`` of a per-message field still 2x), which matters for long conversations.
    """

    default_error_messages = {"invalid": "Not a valid list."}  # noqa: RUF012 (marshmallow's API)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, list):
            raise self.make_error("invalid")
        errors: dict[int, Any] = {}
        for i, message in enumerate(value):
            problem = message_problems(message)
            if problem is not None:
                errors[i] = problem
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
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            return f"content part {i} of type 'text' needs a string 'text'"
    return None


class StreamOptionsSchema(_Base):
    include_usage = StrictBoolean(allow_none=True)


class ChatCompletionSchema(_Base):
    model = ModelName(allow_none=True)
    messages = MessagesField(required=True)
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
    stream = StrictBoolean(allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    seed = fields.Integer(allow_none=True, strict=True)


CHAT_SCHEMA = ChatCompletionSchema()


def first_error(messages: Any, path: list[str]) -> tuple[list[str], str]:
    """Depth-first: the path and text of the first leaf message of a marshmallow error dict."""
    if isinstance(messages, Mapping):
        # Field errors before schema-level ones so `param` is as specific as possible.
        keys = sorted(messages, key=lambda k: (k == "_schema", str(k)))
        for key in keys:
            sub_path = path if key == "_schema" else [*path, str(key)]
            return first_error(messages[key], sub_path)
    if isinstance(messages, list) and messages:
        if all(isinstance(m, str) for m in messages):
            return path, "; ".join(messages)
        return first_error(messages[0], path)
    return path, str(messages)


class ValidatedBody(dict[str, Any]):
    """A body :func:`validate_chat` has already validated (``body.read_json`` validates a large
    body on a worker thread, off the event loop); validating it again returns it as it is.  Only
    gateway code makes one: a client's JSON always parses to a plain ``dict``."""


def validate_chat(body: Any) -> dict[str, Any]:
    """Validate a chat.completions body; return it (unknown fields kept) or raise a 400."""
    if type(body) is ValidatedBody:
        return body
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
#
# The per-field checks are *derived from the schema* (:func:`fast_checks`): each field's kind is
# read from its marshmallow type, its bounds from its ``Range`` validator.  A field of a type the
# fast path cannot check makes the import fail, so a field added to the schema can never be
# silently passed through unchecked by the fast path (issue 11.14: ``logprobs = Boolean()``
# made it accept ``"definitely"``).

_Range = tuple[float | None, float | None]
#: Field kinds the fast path knows (small ints: compared in the per-key loop).
_FLOAT, _INT, _BOOL, _MODEL, _STOP, _STREAM_OPTIONS, _MESSAGES = range(7)
_FastCheck = tuple[int, _Range]
_NO_RANGE: Final[_Range] = (None, None)


def _range_of(name: str, field: fields.Field[Any]) -> _Range:
    """(min, max) of a numeric field, read from its ``Range`` validator (bounds written once)."""
    bound = next((v for v in field.validators if isinstance(v, validate.Range)), None)
    if bound is None:
        return _NO_RANGE
    if not (bound.min_inclusive and bound.max_inclusive):
        raise TypeError(f"{name}: fast_validate checks inclusive ranges only")
    return (bound.min, bound.max)


def fast_checks(schema: Schema) -> dict[str, _FastCheck]:
    """The fast path's check for every field of ``schema``; raises ``TypeError`` naming a field
    whose type (or extra validators) the fast path does not know, so drift fails at import."""
    out: dict[str, _FastCheck] = {}
    for name, field in schema.fields.items():
        kind = type(field)
        if kind is fields.Float:
            out[name] = (_FLOAT, _range_of(name, field))
        elif kind is fields.Integer and getattr(field, "strict", False):
            out[name] = (_INT, _range_of(name, field))
        elif kind is StrictBoolean and not field.validators:
            out[name] = (_BOOL, _NO_RANGE)
        elif kind is ModelName and not field.validators:
            out[name] = (_MODEL, _NO_RANGE)
        elif kind is StringOrList and not field.validators:
            out[name] = (_STOP, _NO_RANGE)
        elif (
            isinstance(field, fields.Nested)
            and kind is fields.Nested
            and isinstance(field.nested, type)
            and issubclass(field.nested, StreamOptionsSchema)
            and set(StreamOptionsSchema().fields) == {"include_usage"}
        ):
            out[name] = (_STREAM_OPTIONS, _NO_RANGE)
        elif kind is MessagesField and not field.validators:
            out[name] = (_MESSAGES, _NO_RANGE)
        else:
            raise TypeError(
                f"schema field {name!r} ({kind.__name__}) has no fast_validate check: teach "
                "fast_checks() its type, or the fast path would pass it through unchecked"
            )
    if out.get("messages", (None,))[0] != _MESSAGES:
        raise TypeError("fast_validate needs the 'messages' field to be a MessagesField")
    return out


_CHECKS: Final = fast_checks(CHAT_SCHEMA)
#: Roles whose message is valid with string content whatever else it holds (not "tool": it
#: needs ``tool_call_id``; not "function": legacy, left to the schema).
_PLAIN_ROLES = frozenset({"system", "developer", "user", "assistant"})


def _plain_message(message: Any) -> bool:
    if type(message) is not dict:
        return False
    role = message.get("role")
    # type() first: a list or object role is unhashable and cannot be looked up in a set.
    if type(message.get("content")) is not str or type(role) is not str:
        return False
    if role not in _PLAIN_ROLES:
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
    checks = _CHECKS
    for key, value in body.items():
        if value is None:  # null means "not given" (validate_with_schema drops them too)
            continue
        check = checks.get(key)
        if check is not None:
            kind, bounds = check
            if kind == _FLOAT:
                vtype = type(value)
                if (vtype is not float and vtype is not int) or not _within(value, bounds):
                    return None
                value = float(value)
            elif kind == _INT:
                if type(value) is not int or not _within(value, bounds):
                    return None
            elif kind == _MODEL:
                if not valid_model_name(value):
                    return None
            elif kind == _BOOL:
                if type(value) is not bool:
                    return None
            elif kind == _STOP:
                if type(value) is not str and not (
                    type(value) is list
                    and 1 <= len(value) <= 4
                    and all(type(v) is str for v in value)
                ):
                    return None
            elif kind == _STREAM_OPTIONS:
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
        path, text = first_error(exc.messages, [])
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
