"""The one error mapping: status, OpenAI envelope, legacy shape, retry hints."""

from __future__ import annotations

from inference_server import errors as e
from inference_server.providers.openai_compat import map_upstream_status


def test_openai_envelope_has_all_four_keys() -> None:
    body = e.error_body(e.InvalidRequest("bad", code="EMPTY_MESSAGES", param="messages"))
    assert body == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "EMPTY_MESSAGES",
        }
    }


def test_legacy_shape_is_the_seeds() -> None:
    body = e.error_body(e.ProviderConnectionFailed("Connection failed: x"), "legacy")
    assert body == {"error": "Connection failed: x", "code": "PROVIDER_CONNECTION_FAILED"}


def test_statuses_and_retryability() -> None:
    cases = [
        (e.ProviderConnectionFailed("x"), 502, True),
        (e.ProviderTimeout("x"), 504, True),
        (e.ProviderError("x"), 502, True),
        (e.ProviderRateLimited("x", retry_after=3), 429, True),
        (e.ProviderAuthFailed("x"), 502, False),
        (e.ProviderBadResponse("x"), 502, False),
        (e.ProviderRejected("x", status=422), 422, False),
        (e.InvalidRequest("x"), 400, False),
        (e.RequestTooLarge("x"), 413, False),
        (e.ModelNotFound("x"), 404, False),
    ]
    for err, status, retryable in cases:
        assert (err.http_status, err.retryable) == (status, retryable), type(err).__name__


def test_retry_after_and_should_retry_headers() -> None:
    headers = e.ProviderRateLimited("x", retry_after=2.4).response_headers()
    assert headers == {
        "Retry-After": "3",  # rounded up: coming back early meets the same pause
        "retry-after-ms": "2400",
        "x-should-retry": "true",
        "x-inference-error-source": "upstream",
    }
    assert e.InvalidRequest("x").response_headers()["x-should-retry"] == "false"
    assert e.InvalidRequest("x").response_headers()["x-inference-error-source"] == "gateway"
    retried = e.ProviderError("x")
    retried.client_retry = False  # the gateway already retried
    assert retried.response_headers()["x-should-retry"] == "false"


def test_upstream_status_mapping() -> None:
    h: dict[str, str] = {}
    assert isinstance(map_upstream_status("p", 500, b"oops", h), e.ProviderError)
    auth = map_upstream_status("p", 401, b'{"error": {"message": "bad key"}}', h)
    assert (auth.http_status, auth.code) == (502, "PROVIDER_AUTH_FAILED")
    limited = map_upstream_status("p", 429, b"{}", {"Retry-After": "7"})
    assert (limited.http_status, limited.retry_after, limited.retryable) == (429, 7.0, True)
    # LM Studio / Triton style string errors and plain text bodies keep their message.
    assert map_upstream_status("p", 400, b'{"error": "No models loaded"}', h).message == (
        "No models loaded"
    )
    assert map_upstream_status("p", 404, b"Not Found", h).http_status == 404
    # llama.cpp sends an integer code: it only repeats the status; the body's code is null.
    llama = map_upstream_status("p", 400, b'{"error": {"code": 400, "message": "m"}}', h)
    assert e.error_body(llama)["error"]["code"] is None
    assert llama.code == "PROVIDER_REJECTED"  # what logs and metrics name it


def openai_error(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    import orjson

    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def test_upstream_4xx_and_429_keep_their_identity() -> None:
    """The client gets the upstream's status, message, type, param and code unchanged."""
    cases = [
        (
            400,
            "This model's maximum context length is 8192 tokens",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        ),
        (
            404,
            "The model `gpt-9` does not exist",
            "invalid_request_error",
            "model_not_found",
            "model",
        ),
        (429, "Rate limit reached for gpt-4o", "requests", "rate_limit_exceeded", None),
        (429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota", None),
        (422, "bad", "invalid_request_error", None, "temperature"),
    ]
    for status, message, type_, code, param in cases:
        err = map_upstream_status("p", status, openai_error(message, type_, code, param), {})
        assert err.http_status == status
        assert e.error_body(err) == {
            "error": {"message": message, "type": type_, "param": param, "code": code}
        }
        assert err.response_headers()["x-inference-error-source"] == "upstream"


def test_quota_and_billing_429s_are_never_retried() -> None:
    for code, type_ in [
        ("insufficient_quota", "insufficient_quota"),
        (None, "insufficient_quota"),  # older bodies: null code
        ("billing_hard_limit_reached", "invalid_request_error"),
    ]:
        err = map_upstream_status(
            "p", 429, openai_error("no credit", type_, code), {"Retry-After": "5"}
        )
        assert isinstance(err, e.ProviderQuotaExceeded)
        assert not err.retryable
        headers = err.response_headers()
        assert headers["x-should-retry"] == "false"
        assert "Retry-After" not in headers
    rate = map_upstream_status(
        "p", 429, openai_error("slow", "requests", "rate_limit_exceeded"), {"Retry-After": "1"}
    )
    assert isinstance(rate, e.ProviderRateLimited)
    assert rate.retryable
