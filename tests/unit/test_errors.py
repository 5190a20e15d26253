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
    assert headers == {"Retry-After": "2", "x-should-retry": "true"}
    assert e.InvalidRequest("x").response_headers()["x-should-retry"] == "false"


def test_upstream_status_mapping() -> None:
    h: dict[str, str] = {}
    assert isinstance(map_upstream_status("p", 500, b"oops", h), e.ProviderError)
    auth = map_upstream_status("p", 401, b'{"error": {"message": "bad key"}}', h)
    assert (auth.http_status, auth.code) == (502, "PROVIDER_AUTH_FAILED")
    limited = map_upstream_status("p", 429, b"{}", {"Retry-After": "7"})
    assert (limited.http_status, limited.retry_after) == (429, 7.0)
    rejected = map_upstream_status(
        "p",
        400,
        b'{"error": {"message": "too long", "code": "context_length_exceeded",'
        b' "param": "messages"}}',
        h,
    )
    assert (rejected.http_status, rejected.code, rejected.param, rejected.message) == (
        400,
        "CONTEXT_LENGTH_EXCEEDED",
        "messages",
        "too long",
    )
    # LM Studio / Triton style string errors and plain text bodies keep their message.
    assert map_upstream_status("p", 400, b'{"error": "No models loaded"}', h).message == (
        "No models loaded"
    )
    assert map_upstream_status("p", 404, b"Not Found", h).http_status == 404
    # llama.cpp sends an integer code: not a string code for our envelope.
    llama = map_upstream_status("p", 400, b'{"error": {"code": 400, "message": "m"}}', h)
    assert llama.code == "PROVIDER_REJECTED"
