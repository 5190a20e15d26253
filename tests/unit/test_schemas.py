"""Request validation: the seed's codes, OpenAI's ranges, and pass-through of everything else."""

from __future__ import annotations

import random
from typing import Any

import pytest

from inference_server import schemas
from inference_server.errors import InvalidRequest
from inference_server.schemas import validate_chat

USER = [{"role": "user", "content": "hi"}]


def _err(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_chat(body)
    return info.value


def test_empty_messages_has_the_seed_message_and_code() -> None:
    err = _err({"messages": []})
    assert (err.message, err.code, err.param) == (
        "Messages array cannot be empty",
        "EMPTY_MESSAGES",
        "messages",
    )


def test_missing_messages() -> None:
    err = _err({"model": "m"})
    assert err.code == "MISSING_PARAMETER"
    assert err.param == "messages"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stream": "maybe"}, "stream"),
    ],
)
def test_out_of_range_parameters(extra: dict[str, Any], param: str) -> None:
    err = _err({"messages": USER, **extra})
    assert err.code == "INVALID_PARAMETER"
    assert err.param == param
    assert param in err.message


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "bot", "content": "x"}, "messages.0.role"),
        ({"content": "x"}, "messages.0.role"),
        ({"role": "user"}, "messages.0.content"),
        ({"role": "user", "content": 5}, "messages.0.content"),
        ({"role": "user", "content": []}, "messages.0.content"),
        ({"role": "user", "content": [{"text": "no type"}]}, "messages.0.content"),
        ({"role": "tool", "content": "x"}, "messages.0.tool_call_id"),
        ({"role": "assistant"}, "messages.0.content"),
    ],
)
def test_bad_messages(message: dict[str, Any], param: str) -> None:
    assert _err({"messages": [message]}).param == param


def test_messages_must_be_objects() -> None:
    assert _err({"messages": ["hello"]}).param == "messages.0"
    assert _err({"messages": "hello"}).param == "messages"


def test_body_must_be_an_object() -> None:
    assert _err([1, 2]).code == "INVALID_REQUEST"


def test_valid_request_passes_unknown_fields_through() -> None:
    body: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "developer", "content": [{"type": "text", "text": "d"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "r", "tool_call_id": "c"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "n": 2,
        "user": "u1",
        "seed": 42,
        "stop": ["The end", "END"],
        "verbosity": "low",
        "temperature": 0.7,
        "max_tokens": 150,
    }
    out = validate_chat(body)
    for key in ("tools", "tool_choice", "response_format", "logprobs", "user", "verbosity"):
        assert out[key] == body[key]
    assert out["messages"][3]["tool_calls"] == body["messages"][3]["tool_calls"]


def test_nulls_mean_absent() -> None:
    out = validate_chat({"messages": USER, "temperature": None, "stop": None, "model": None})
    assert "temperature" not in out
    assert "stop" not in out
    assert "model" not in out


# --- the fast path agrees with the schema ---------------------------------------------------

_VALUES: list[Any] = [
    None, True, False, 0, 1, 2, 3, 129, -1, -3, 10**30, 0.0, 0.5, 1.5, 2.5, -2.0, -2.5,
    "", "x", "0.5", "true", [], ["a"], ["a", "b", "c", "d"], ["a"] * 5, [1], {},
    {"include_usage": True}, {"include_usage": False}, {"include_usage": None},
    {"include_usage": "yes"}, {"include_usage": 1}, {"other": 1},
]  # fmt: skip
_KEYS = [
    "model", "temperature", "top_p", "frequency_penalty", "presence_penalty", "max_tokens",
    "max_completion_tokens", "n", "stop", "stream", "stream_options", "seed", "user", "tools",
]  # fmt: skip
_MESSAGES: list[Any] = [
    {"role": "user", "content": "hi"},
    {"role": "system", "content": ""},
    {"role": "developer", "content": "d", "name": "n"},
    {"role": "assistant", "content": "a", "name": 3},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]},
    {"role": "assistant", "content": None},
    {"role": "tool", "content": "r", "tool_call_id": "c"},
    {"role": "tool", "content": "r"},
    {"role": "function", "content": "f", "name": "f"},
    {"role": "user", "content": [{"type": "text", "text": "x"}]},
    {"role": "user", "content": []},
    {"role": "user", "content": 5},
    {"role": "robot", "content": "x"},
    {"content": "no role"},
    {"role": "user", "content": "x", "tool_call_id": 7},
    {"role": "user", "content": "x", "extra": {"kept": True}},
    "not an object",
]


def _schema_answer(body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return schemas.validate_with_schema(dict(body))
    except InvalidRequest:
        return None


@pytest.mark.differential
def test_fast_path_accepts_only_what_the_schema_accepts_and_returns_the_same() -> None:
    """Thousands of generated bodies: whenever the fast path answers, marshmallow agrees."""
    rng = random.Random(7)
    answered = 0
    for _ in range(5000):
        body: dict[str, Any] = {}
        if rng.random() < 0.95:
            n = rng.randint(1, 4)
            weights = [12] + [1] * (len(_MESSAGES) - 1)  # mostly plain user messages
            picked = rng.choices(_MESSAGES, weights, k=n)
            body["messages"] = [dict(m) if isinstance(m, dict) else m for m in picked]
        else:
            body["messages"] = rng.choice([None, "x", {}, [None]])
        for key in rng.sample(_KEYS, rng.randint(0, 4)):
            body[key] = rng.choice(_VALUES)
        fast = schemas.fast_validate(dict(body))
        expected = _schema_answer(body)
        if fast is not None:
            answered += 1
            assert expected is not None, body
            assert fast == expected, body
            assert all(type(fast[k]) is type(expected[k]) for k in fast), body  # 1 -> 1.0
    assert answered > 300  # the generator does reach the fast path


def test_fast_path_answers_the_common_request() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        "temperature": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": None,
    }
    fast = schemas.fast_validate(body)
    assert fast == schemas.validate_with_schema(body)
    assert fast is not None
    assert fast["temperature"] == 1.0
    assert "user" not in fast
