"""Validation of the embeddings, completions and responses bodies (marshmallow, like chat).

Same rules as ``schemas.py``: instances built once, ``unknown=INCLUDE`` (new OpenAI fields pass
through), every error a 400 in the OpenAI envelope naming the dotted ``param``:
``MISSING_PARAMETER`` for an absent required field, ``INVALID_PARAMETER`` otherwise.  Sizes a
client controls are bounded here (inputs per request, prompt list lengths, ``n``).
"""

from __future__ import annotations

from typing import Any

from marshmallow import INCLUDE, Schema, ValidationError, fields, validate

from inference_server.errors import InvalidRequest
from inference_server.schemas import StringOrList, first_error

#: OpenAI's own limits: at most 2048 inputs per embeddings request.
MAX_INPUTS = 2048
_MISSING = "Missing data for required field."


class _Base(Schema):
    class Meta:
        unknown = INCLUDE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(t) and t >= 0 for t in value)


class TextOrTokens(fields.Field[Any]):
    """``input`` / ``prompt``: a string, a list of strings, a list of token ids, or a list of
    token-id lists; lists non-empty and at most ``MAX_INPUTS`` long."""

    def __init__(self, *, allow_empty_string: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.allow_empty_string = allow_empty_string

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if not value and not self.allow_empty_string:
                raise ValidationError("must not be an empty string")
            return value
        if not isinstance(value, list) or not value:
            raise ValidationError(
                "must be a string, a list of strings, a list of token ids or a list of "
                "token-id lists (lists non-empty)"
            )
        if len(value) > MAX_INPUTS:
            raise ValidationError(f"must hold at most {MAX_INPUTS} items")
        if all(isinstance(v, str) for v in value):
            if not self.allow_empty_string and any(not v for v in value):
                raise ValidationError("must not contain empty strings")
            return value
        if _token_list(value) or all(_token_list(v) for v in value):
            return value
        raise ValidationError(
            "must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (lists non-empty)"
        )


class EmbeddingsSchema(_Base):
    model = fields.String(allow_none=True)
    input = TextOrTokens(required=True, allow_empty_string=False)
    encoding_format = fields.String(allow_none=True, validate=validate.OneOf(("float", "base64")))
    dimensions = fields.Integer(allow_none=True, strict=True, validate=validate.Range(1, 65536))
    user = fields.String(allow_none=True)


class StreamOptionsSchema(_Base):
    include_usage = fields.Boolean(allow_none=True)


class CompletionsSchema(_Base):
    model = fields.String(allow_none=True)
    prompt = TextOrTokens(required=True, allow_empty_string=True)
    suffix = fields.String(allow_none=True)
    echo = fields.Boolean(allow_none=True)
    logprobs = fields.Integer(allow_none=True, strict=True, validate=validate.Range(0, 5))
    best_of = fields.Integer(allow_none=True, strict=True, validate=validate.Range(1, 20))
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2))
    top_p = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    frequency_penalty = fields.Float(allow_none=True, validate=validate.Range(-2, 2))
    presence_penalty = fields.Float(allow_none=True, validate=validate.Range(-2, 2))
    max_tokens = fields.Integer(allow_none=True, strict=True, validate=validate.Range(min=0))
    n = fields.Integer(allow_none=True, strict=True, validate=validate.Range(1, 128))
    stop = StringOrList(allow_none=True)
    stream = fields.Boolean(allow_none=True)
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    seed = fields.Integer(allow_none=True, strict=True)
    user = fields.String(allow_none=True)


EMBEDDINGS_SCHEMA = EmbeddingsSchema()
COMPLETIONS_SCHEMA = CompletionsSchema()


def invalid(param: str | None, text: str) -> InvalidRequest:
    """The 400 for one problem (``MISSING_PARAMETER`` when a required field is absent)."""
    if text == _MISSING:
        return InvalidRequest(
            f"Missing required parameter: '{param}'", code="MISSING_PARAMETER", param=param
        )
    return InvalidRequest(
        f"Invalid value for '{param}': {text}" if param else text,
        code="INVALID_PARAMETER",
        param=param,
    )


def load(schema: Schema, body: Any) -> dict[str, Any]:
    """``body`` validated by ``schema`` (nulls dropped: upstreams that reject them never see
    them), or the 400 naming the first problem."""
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object", code="INVALID_REQUEST")
    try:
        data: dict[str, Any] = schema.load(body)
    except ValidationError as exc:
        path, text = first_error(exc.messages, [])
        raise invalid(".".join(path) or None, text) from exc
    for key in [k for k, v in data.items() if v is None]:
        del data[key]
    return data


def validate_embeddings(body: Any) -> dict[str, Any]:
    """An embeddings body; ``input`` always becomes a list (one entry per vector wanted)."""
    data = load(EMBEDDINGS_SCHEMA, body)
    item = data["input"]
    if isinstance(item, str) or (isinstance(item, list) and _is_int(item[0])):
        data["input"] = [item]
    return data


def validate_completions(body: Any) -> dict[str, Any]:
    """A legacy completions body (``best_of`` ≥ ``n``, as OpenAI requires)."""
    data = load(COMPLETIONS_SCHEMA, body)
    best_of, n = data.get("best_of"), data.get("n") or 1
    if best_of is not None and best_of < n:
        raise invalid("best_of", f"must be at least n ({n})")
    if data.get("stream") and best_of is not None and best_of > 1:
        raise invalid("best_of", "cannot be streamed: best_of > 1 needs stream false")
    return data


# --- the Responses API ---------------------------------------------------------------------

#: Response ids are ours (``resp_`` + hex) or an upstream's: bounded, plain characters.
RESPONSE_ID = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_ITEMS = 2048
MAX_TOOLS = 128


class ResponseInput(fields.Field[Any]):
    """``input``: a string, or a non-empty list of at most ``MAX_ITEMS`` item objects (their
    shapes are checked where they are translated, with the item's index as ``param``)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValidationError("must be a string or a non-empty list of input items")
        if len(value) > MAX_ITEMS:
            raise ValidationError(f"must hold at most {MAX_ITEMS} items")
        if not all(isinstance(v, dict) for v in value):
            raise ValidationError("every input item must be an object")
        return value


class ToolChoice(fields.Field[Any]):
    """``tool_choice``: none | auto | required, or ``{"type": "function", "name": ...}``."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value in ("none", "auto", "required"):
            return value
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            if value["type"] == "function" and not isinstance(value.get("name"), str):
                raise ValidationError("a function tool_choice needs a name")
            return value
        raise ValidationError("must be none, auto, required or a tool object")


class FormatSchema(_Base):
    type = fields.String(
        required=True, validate=validate.OneOf(("text", "json_schema", "json_object"))
    )
    name = fields.String(allow_none=True, validate=validate.Length(max=64))
    schema = fields.Dict(allow_none=True)
    strict = fields.Boolean(allow_none=True)


class TextSchema(_Base):
    format = fields.Nested(FormatSchema, allow_none=True)


class ResponsesSchema(_Base):
    model = fields.String(allow_none=True)
    input = ResponseInput(required=True)
    instructions = fields.String(allow_none=True)
    max_output_tokens = fields.Integer(allow_none=True, strict=True, validate=validate.Range(min=1))
    temperature = fields.Float(allow_none=True, validate=validate.Range(0, 2))
    top_p = fields.Float(allow_none=True, validate=validate.Range(0, 1))
    tools = fields.List(fields.Dict(), allow_none=True, validate=validate.Length(max=MAX_TOOLS))
    tool_choice = ToolChoice(allow_none=True)
    text = fields.Nested(TextSchema, allow_none=True)
    stream = fields.Boolean(allow_none=True)
    store = fields.Boolean(allow_none=True)
    previous_response_id = fields.String(
        allow_none=True, validate=validate.Regexp(RESPONSE_ID, error="not a response id")
    )
    metadata = fields.Dict(allow_none=True)
    parallel_tool_calls = fields.Boolean(allow_none=True)
    user = fields.String(allow_none=True)


RESPONSES_SCHEMA = ResponsesSchema()


def validate_responses(body: Any) -> dict[str, Any]:
    """A Responses API body (item and tool shapes are checked when translated)."""
    data = load(RESPONSES_SCHEMA, body)
    for i, tool in enumerate(data.get("tools") or ()):
        if not isinstance(tool.get("type"), str):
            raise invalid(f"tools.{i}.type", "Missing data for required field.")
    return data
