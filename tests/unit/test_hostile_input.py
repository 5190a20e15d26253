"""Hostile input and secret hygiene, unit level: the schema's new rules (model names, strict
booleans, typed text parts, non-string roles), the fast path derived from the schema, JSON depth,
the scrubber, header and log hygiene, and secrets kept out of reprs and printed config."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import fields, validate

from inference_server import body as body_mod
from inference_server import schemas
from inference_server.errors import InvalidRequest, ProviderRejected
from inference_server.providers.base import ProviderConfig, Timeouts
from inference_server.schemas import validate_chat
from inference_server.scrub import (
    Scrubber,
    header_value,
    mask_url,
    printable,
    provider_secrets,
    url_secrets,
)
from inference_server.settings import masked

USER = [{"role": "user", "content": "hi"}]


def _err(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_chat(body)
    return info.value


# --- schema rules --------------------------------------------------------------------------


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 5, None])
def test_a_role_of_any_type_is_a_400_not_a_crash(role: Any) -> None:
    err = _err({"messages": [{"role": role, "content": "x"}]})
    assert err.param == "messages.0.role"


@pytest.mark.parametrize("value", ["yes", 1, "true", "on", 0, "no"])
def test_stream_must_be_a_json_boolean(value: Any) -> None:
    assert _err({"messages": USER, "stream": value}).param == "stream"
    err = _err({"messages": USER, "stream_options": {"include_usage": value}})
    assert err.param == "stream_options.include_usage"


def test_text_parts_need_string_text() -> None:
    for text in (5, None, ["x"], {"t": 1}):
        part = {"type": "text", "text": text}
        assert _err({"messages": [{"role": "user", "content": [part]}]}).param == (
            "messages.0.content"
        )
    ok = validate_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]})
    assert ok["messages"][0]["content"][0]["text"] == "x"


@pytest.mark.parametrize(
    "model",
    [
        "a\r\nx-injected: 1",
        "a\nb",
        "nul\x00",
        "del\x7f",
        "c1\x85",
        "sep\u2028",
        "",
        "m" * (schemas.MAX_MODEL_NAME_CHARS + 1),
        5,
        ["m"],
    ],
)
def test_bad_model_names_are_a_400_on_both_paths(model: Any) -> None:
    body = {"model": model, "messages": USER}
    assert schemas.fast_validate(dict(body)) is None
    err = _err(body)
    assert (err.code, err.param) == ("INVALID_PARAMETER", "model")


@pytest.mark.parametrize("model", ["gpt-4o", "meta/llama-3:8b", "m" * 256, "модель 1"])
def test_good_model_names_pass_both_paths(model: str) -> None:
    body = {"model": model, "messages": USER}
    assert schemas.fast_validate(dict(body)) == schemas.validate_with_schema(dict(body))


# --- the fast path is derived from the schema ----------------------------------------------


def test_every_schema_field_has_a_fast_path_check() -> None:
    assert set(schemas.fast_checks(schemas.CHAT_SCHEMA)) == set(schemas.CHAT_SCHEMA.fields)


def test_a_field_the_fast_path_cannot_check_fails_at_import() -> None:
    """Issue 11.14: ``logprobs = Boolean()`` made the fast path accept ``"definitely"``."""

    class Drifted(schemas.ChatCompletionSchema):
        logprobs = fields.Boolean(allow_none=True)

    with pytest.raises(TypeError, match="logprobs"):
        schemas.fast_checks(Drifted())


def test_a_known_field_type_gets_its_check_derived() -> None:
    class Extended(schemas.ChatCompletionSchema):
        logprobs = schemas.StrictBoolean(allow_none=True)
        top_logprobs = fields.Integer(strict=True, validate=validate.Range(0, 20))

    checks = schemas.fast_checks(Extended())
    assert checks["logprobs"][0] == checks["stream"][0]
    assert checks["top_logprobs"][1] == (0, 20)


# --- JSON depth ------------------------------------------------------------------------------


def _nested(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_depth_at_the_limit_parses_and_one_more_is_a_400() -> None:
    assert body_mod.parse(_nested(body_mod.MAX_JSON_DEPTH))
    with pytest.raises(InvalidRequest) as info:
        body_mod.parse(_nested(body_mod.MAX_JSON_DEPTH + 1))
    assert info.value.code == "INVALID_JSON"


@pytest.mark.parametrize("depth", [254, 300, 1000])
def test_deep_json_that_orjson_parses_is_rejected_fast(depth: int) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequest):
        body_mod.parse(_nested(depth))
    assert time.perf_counter() - started < 0.1


def test_depth_walk_is_exact_on_wide_and_mixed_values() -> None:
    wide: Any = [{"a": [1, 2, {"b": []}]}] * 1000
    assert not body_mod.too_deep(wide, 5)  # list > dict > list > dict > list
    assert body_mod.too_deep(wide, 4)
    assert not body_mod.too_deep("x", 0)


# --- the scrubber ------------------------------------------------------------------------------

KEY = "sk-live-abcdef0123456789"


def test_scrubber_replaces_every_form_of_every_secret() -> None:
    scrubber = Scrubber([KEY, "short", None, "hunter2hunter2"])
    text = f"bad key {KEY} ({KEY.upper()}, {KEY.lower()}) hunter2hunter2 short"
    assert scrubber.scrub(text) == "bad key *** (***, ***) *** short"
    assert KEY not in repr(scrubber)
    assert Scrubber().scrub(text) == text
    assert not Scrubber()


@settings(max_examples=300, deadline=None)
@given(
    secrets=st.lists(st.text(min_size=8, max_size=20), min_size=1, max_size=3),
    parts=st.lists(st.text(max_size=10), min_size=1, max_size=4),
    case=st.sampled_from([str, str.upper, str.lower]),
)
def test_no_form_of_a_secret_survives_scrubbing(
    secrets: list[str], parts: list[str], case: Any
) -> None:
    scrubber = Scrubber(secrets)
    text = case(secrets[0]).join(parts) + case(secrets[-1])
    out = scrubber.scrub(text)
    for secret in secrets:
        for form in (secret, secret.upper(), secret.lower()):
            assert form not in out
    assert scrubber.contains_secret(text)


def test_a_secret_cannot_re_form_around_a_replacement() -> None:
    secret = "x***yyyy"
    assert Scrubber([secret]).scrub("x" + secret + "yyyy") == "***"


def test_scrub_error_cleans_every_field_and_keeps_codes_tokens() -> None:
    err = ProviderRejected(
        f"no {KEY}", code=KEY.upper(), param=KEY, headers={"x-echo": f"Bearer {KEY}\r\n"}
    )
    Scrubber([KEY]).scrub_error(err)
    assert (err.message, err.param, err.code) == ("no ***", "***", "PROVIDER_REJECTED")
    assert err.args == ("no ***",)
    assert err.headers == {"x-echo": "Bearer ***%0D%0A"}
    weird = ProviderRejected("x", code="has spaces\nand lines")
    assert Scrubber().scrub_error(weird).code == "PROVIDER_REJECTED"
    assert Scrubber().scrub_error(ProviderRejected("x", code="INVALID_VALUE")).code == (
        "INVALID_VALUE"
    )


def test_url_credentials_are_secrets_and_masked() -> None:
    url = "http://bob:p%40ss-w0rd-long@example.com:8080/v1"
    found = url_secrets(url)
    assert "p%40ss-w0rd-long" in found
    assert "p@ss-w0rd-long" in found
    assert mask_url(url) == "http://***@example.com:8080/v1"
    assert mask_url("http://example.com/v1") == "http://example.com/v1"
    assert url_secrets("http://example.com/v1") == []


def _config(**kw: Any) -> ProviderConfig:
    base: dict[str, Any] = {
        "name": "p",
        "plugin": "openai",
        "base_url": "http://user:url-secret-123@h/v1",
        "api_key": KEY,
        "timeouts": Timeouts(1, 1, 1, 1),
        "max_retries": 0,
        "options": {"token": "option-secret-1", "ttl": 5},
    }
    return ProviderConfig(**{**base, **kw})


def test_provider_config_repr_shows_no_secret() -> None:
    text = repr(_config())
    for secret in (KEY, "url-secret-123", "option-secret-1"):
        assert secret not in text
    assert "'ttl': 5" in text
    assert set(provider_secrets(_config())) >= {KEY, "url-secret-123", "option-secret-1"}


def test_masked_config_hides_url_credentials_everywhere() -> None:
    tree = {
        "providers": {"a": {"plugin": "openai", "base_url": "https://u:KEY-in-url-1@h/v1"}},
        "telemetry": {"traces": {"otlp_endpoint": "http://x:otlp-secret-1@c:4318"}},
        "inference": {"allowed_models": ["http://q:list-secret-1@h"]},
    }
    text = repr(masked(tree))
    for secret in ("KEY-in-url-1", "otlp-secret-1", "list-secret-1"):
        assert secret not in text


def test_masked_config_keeps_settings_that_only_sound_like_secrets() -> None:
    """Declared keys are secret only when declared so, and ``max_tokens`` is not a token: a
    masked (--print-config) tree still loads (`make bench` feeds it back as a settings file)."""
    tree = {
        "cache": {"hits_count_tokens": True},
        "limits": {"default_max_tokens": 256},
        "models": {"m": {"provider": "p", "params": {"max_tokens": 64}}},
        "providers": {"p": {"plugin": "openai", "api_key": "sk-real-secret-1", "tokens": "x"}},
        "secrets": {"anything": "hidden-value-1"},
    }
    out = masked(tree)
    assert out["cache"]["hits_count_tokens"] is True
    assert out["limits"]["default_max_tokens"] == 256
    assert out["models"]["m"]["params"]["max_tokens"] == 64
    assert out["providers"]["p"]["api_key"] == "***"
    assert out["secrets"] == "***"


def test_settings_keep_no_unmasked_secret_they_do_not_need(make_settings: Any) -> None:
    settings = make_settings(
        {
            "server": {"admin_token": "admin-token-1234"},
            "inference": {"base_url": "http://u:url-pass-1234@127.0.0.1:1/v1"},
            "telemetry": {
                "traces": {
                    "headers": {"authorization": "otlp-header-1234"},
                    "otlp_endpoint": "http://c:otlp-pass-1234@127.0.0.1:4318/v1/traces",
                }
            },
        },
        secrets={"default": {"secrets": {"unused": "unused-secret-1234"}}},
    )
    text = repr(settings)
    secrets = ("admin-token-1234", "url-pass-1234", "otlp-header-1234", "otlp-pass-1234")
    for secret in (*secrets, "unused-secret-1234"):
        assert secret not in text, secret
        assert settings.scrubber.contains_secret(f"x {secret} y"), secret
    assert settings.admin_token == "admin-token-1234"  # kept: the app needs it


def test_print_config_masks_url_credentials(
    make_settings: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from inference_server import cli

    make_settings({"inference": {"base_url": "http://u:url-pass-1234@127.0.0.1:1/v1"}})
    assert cli.main(["--config", str(tmp_path / "settings.yaml"), "--print-config"]) == 0
    assert cli.main(["--config", str(tmp_path / "settings.yaml"), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert "url-pass-1234" not in out
    assert "http://***@127.0.0.1:1/v1" in out


# --- headers and log lines ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["a\r\nb", "nul\x00", "é", "x" * 600, "100%"])
def test_header_values_are_printable_ascii_and_bounded(text: str) -> None:
    value = header_value(text)
    assert value.isascii()
    assert value.isprintable()
    assert len(value) <= 512


def test_printable_escapes_line_breaks() -> None:
    assert printable("/v1/x\r\n2026 INFO forged") == "/v1/x\\r\\n2026 INFO forged"
    assert printable("plain") == "plain"


def test_fields_named_like_tokens_are_not_secrets() -> None:
    """``max_tokens: "max_tokens_in"`` (a Triton input name) must not be scrubbed from messages;
    ``access_token`` and ``admin_token`` are secrets."""
    from inference_server.settings import collect_secrets

    tree = {
        "providers": {
            "t": {
                "plugin": "triton",
                "api_key": "real-secret-key-1",
                "models": {"e": {"inputs": {"max_tokens": "max_tokens_in"}}},
                "outputs": {"completion_tokens": "num_output_tokens"},
                "access_token": "access-token-1234",
            }
        },
        "server": {"admin_token": "admin-token-1234"},
    }
    found = set(collect_secrets(tree))
    assert found == {"real-secret-key-1", "access-token-1234", "admin-token-1234"}
    scrubber = Scrubber(found)
    text = "Invalid value for 'max_tokens_in' (num_output_tokens): real-secret-key-1"
    assert scrubber.scrub(text) == "Invalid value for 'max_tokens_in' (num_output_tokens): ***"
