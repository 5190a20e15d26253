"""The gateway's one exception hierarchy and its one mapping to HTTP.

Every failure the gateway can report is a :class:`GatewayError` subclass that knows its HTTP
status, its OpenAI ``type``, its ``code`` (the seed's upper-case codes) and whether a retry or a
fallback may help.  :func:`error_body` is the only place an error becomes a JSON body, so the
non-streaming response, the terminal SSE event and the legacy flat shape can never disagree.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

ErrorFormat = Literal["openai", "legacy"]


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "INTERNAL_ERROR"
    #: True when the same request may succeed on another attempt or another deployment.
    retryable: ClassVar[bool] = False
    #: "gateway": the gateway detected this and wrote the body; "upstream": the body's fields
    #: are the upstream's own (sent as ``x-inference-error-source``).
    source: ClassVar[str] = "gateway"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.retry_after = retry_after
        self.headers: dict[str, str] = dict(headers or {})
        self.status_override: int | None = status
        #: Set by the pipeline once it knows whether a client retry can help (it cannot when the
        #: gateway already retried or failed over); None: the class's ``retryable`` decides.
        self.client_retry: bool | None = None

    @property
    def http_status(self) -> int:
        """The status sent to the client (a few errors carry the upstream's own status)."""
        return self.status_override if self.status_override is not None else self.status

    @property
    def error_type(self) -> str:
        """The OpenAI ``type`` of the body."""
        return self.type

    @property
    def wire_code(self) -> str | None:
        """The ``code`` of the body (an upstream's own code may be null)."""
        return self.code

    def response_headers(self) -> dict[str, str]:
        """Headers that belong with this error: Retry-After, the SDK retry hint, the source."""
        headers = dict(self.headers)
        if self.retry_after is not None:
            # Rounded up: a client that comes back early meets the same pause again.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        # openai-python obeys x-should-retry before its own rules (it would retry 408/409/429/
        # 5xx): "false" for what a retry cannot fix or what the gateway already retried.
        retry = self.retryable if self.client_retry is None else self.client_retry
        headers["x-should-retry"] = "true" if retry else "false"
        headers["x-inference-error-source"] = self.source
        return headers


# --- client errors -------------------------------------------------------------------------


class InvalidRequest(GatewayError):
    """The request body or parameters are invalid (400)."""

    status = 400
    type = "invalid_request_error"
    default_code = "INVALID_REQUEST"


class InvalidSettings(GatewayError):
    """A hot reload's settings failed validation; the running settings are kept (422, issue 16)."""

    status = 422
    type = "invalid_request_error"
    default_code = "INVALID_SETTINGS"


class NotFound(GatewayError):
    """No such route or resource (404)."""

    status = 404
    type = "invalid_request_error"
    default_code = "NOT_FOUND"


class ModelNotFound(NotFound):
    """The model id is not served by this gateway (404)."""

    default_code = "MODEL_NOT_FOUND"


class MethodNotAllowed(GatewayError):
    """The route exists but not for this HTTP method (405)."""

    status = 405
    type = "invalid_request_error"
    default_code = "METHOD_NOT_ALLOWED"


class RequestTooLarge(GatewayError):
    """The body exceeds ``server.max_body_bytes`` (413)."""

    status = 413
    type = "invalid_request_error"
    default_code = "REQUEST_TOO_LARGE"


class UnsupportedMediaType(GatewayError):
    """The body is not ``application/json`` (415)."""

    status = 415
    type = "invalid_request_error"
    default_code = "UNSUPPORTED_MEDIA_TYPE"


class ServiceUnavailable(GatewayError):
    """The gateway itself cannot take the request now, e.g. while shutting down (503)."""

    status = 503
    type = "server_error"
    default_code = "SERVICE_UNAVAILABLE"
    retryable = True


class Unauthorized(GatewayError):
    """Missing or wrong credentials for a protected endpoint (401)."""

    status = 401
    type = "authentication_error"
    default_code = "UNAUTHORIZED"


class Forbidden(GatewayError):
    """The endpoint is disabled or the caller may not use it (403)."""

    status = 403
    type = "permission_error"
    default_code = "FORBIDDEN"


class InvalidApiKey(Unauthorized):
    """No key, or a key the gateway does not know (or disabled, expired) on /v1/* (401)."""

    type = "invalid_request_error"
    default_code = "INVALID_API_KEY"


class ModelNotAllowedForKey(Forbidden):
    """The key exists but may not use the requested model (403)."""

    default_code = "MODEL_NOT_ALLOWED_FOR_KEY"


class RateLimited(GatewayError):
    """A gateway rate limit (rpm, tpm, max_parallel) of the key, the model or all traffic (429).

    Retryable by the client after ``Retry-After``: the gateway never sent anything upstream.
    """

    status = 429
    type = "rate_limit_error"
    default_code = "RATE_LIMITED"
    retryable = True


class BudgetExceeded(GatewayError):
    """The key spent its token budget for the period (429); waiting seconds will not help."""

    status = 429
    type = "insufficient_quota"
    default_code = "BUDGET_EXCEEDED"


# --- WebSocket requests (websocket.py) ---------------------------------------------------------


class RequestCancelled(GatewayError):
    """WebSocket: the client cancelled this request on its socket (and its upstream call)."""

    status = 499
    type = "invalid_request_error"
    default_code = "REQUEST_CANCELLED"


class OriginNotAllowed(Forbidden):
    """WebSocket: a browser page's upgrade from an origin not in ``server.cors.allow_origins``."""

    default_code = "ORIGIN_NOT_ALLOWED"


class TooManyInFlight(RateLimited):
    """WebSocket: more requests at once on one socket than ``websocket.max_in_flight``."""

    default_code = "TOO_MANY_IN_FLIGHT"


class NoDeploymentAvailable(GatewayError):
    """Every deployment of the route (and its fallbacks) is out and panic routing is off."""

    status = 503
    type = "server_error"
    default_code = "NO_DEPLOYMENT_AVAILABLE"

    def response_headers(self) -> dict[str, str]:
        # Not retried inside this request (nothing was tried); the client may come back after
        # Retry-After, the real time to the next probe.
        headers = super().response_headers()
        headers["x-should-retry"] = "true"
        return headers


class InternalError(GatewayError):
    """A bug in the gateway; the client sees a generic message, the log the traceback."""


class RequestTimeout(GatewayError):
    """The client did not send its request (headers or body) in time (408)."""

    status = 408
    type = "invalid_request_error"
    default_code = "REQUEST_TIMEOUT"


class LocalResourceExhausted(GatewayError):
    """The gateway itself ran out of a local resource (file descriptors, memory, ports) (503).

    Not ``retryable`` inside the request (another deployment would need the same resource) and
    not a provider failure, so it neither trips a breaker nor marks a provider unhealthy.  The
    client may retry shortly, which the headers say.
    """

    status = 503
    type = "server_error"
    default_code = "GATEWAY_OVERLOADED"

    def response_headers(self) -> dict[str, str]:
        headers = super().response_headers()
        headers["x-should-retry"] = "true"
        headers.setdefault("Retry-After", "1")
        return headers


#: errno values that mean "this process or host is out of something", not "the peer failed".
LOCAL_RESOURCE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EADDRNOTAVAIL}
)


def local_resource_error(exc: BaseException) -> LocalResourceExhausted | None:
    """A :class:`LocalResourceExhausted` if ``exc`` (or what caused it) is a local resource
    failure, else None.

    aiohttp's ``ClientConnectorError`` and ``ClientOSError`` are ``OSError``s carrying the
    original ``errno``; the cause chain is walked too (a few levels), since a provider may
    wrap the error.  Called where connection errors become ``ProviderConnectionFailed``.
    """
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, OSError) and current.errno in LOCAL_RESOURCE_ERRNOS:
            name = errno.errorcode.get(current.errno, str(current.errno))
            return LocalResourceExhausted(
                f"The gateway is out of local resources ({name}); retry shortly"
            )
        current = current.__cause__ or current.__context__
        seen += 1
    return None


# --- upstream (provider) errors ------------------------------------------------------------


class ProviderError(GatewayError):
    """The provider failed with a server-side error (upstream 5xx) (502)."""

    status = 502
    type = "api_error"
    default_code = "PROVIDER_ERROR"
    retryable = True


class ProviderConnectionFailed(ProviderError):
    """The provider could not be reached at all (502)."""

    default_code = "PROVIDER_CONNECTION_FAILED"


class ProviderTimeout(ProviderError):
    """The provider did not answer within the configured time (504)."""

    status = 504
    default_code = "PROVIDER_TIMEOUT"


class ProviderBadResponse(ProviderError):
    """The provider answered with something that is not its documented protocol (502)."""

    default_code = "PROVIDER_BAD_RESPONSE"
    retryable = False


class ProviderAuthFailed(ProviderError):
    """The provider refused the gateway's own credentials: an operator problem (502)."""

    default_code = "PROVIDER_AUTH_FAILED"
    retryable = False


class ProviderRejected(GatewayError):
    """The upstream answered 4xx: the client gets its status, ``message``, ``type``, ``param``
    and ``code`` unchanged (``source`` "upstream").

    ``code`` may be given as the upstream sent it (``context_length_exceeded``); when the upstream
    sent none, the body's code is null and :attr:`code` (for logs and metrics) falls back to the
    class default.  Not retryable: the same body would be rejected again.
    """

    status = 400
    type = "invalid_request_error"
    default_code = "PROVIDER_REJECTED"
    source = "upstream"

    def __init__(self, message: str, *, error_type: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        #: The upstream's own ``code`` and ``type`` as sent (the scrubber may clear them).
        self.upstream_code: str | None = kwargs.get("code")
        self.upstream_type = error_type

    @property
    def error_type(self) -> str:
        return self.upstream_type or self.type

    @property
    def wire_code(self) -> str | None:
        return self.upstream_code


class ProviderRateLimited(ProviderRejected):
    """The upstream asked us to slow down (429, its Retry-After kept): backpressure, not a fault.

    The deployment is paused for the Retry-After; retryable on another deployment or after it.
    """

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"
    retryable = True


class ProviderQuotaExceeded(ProviderRateLimited):
    """The upstream's 429 says the account is out of quota or credit: a retry cannot help."""

    type = "insufficient_quota"
    default_code = "insufficient_quota"
    retryable = False


#: Upstream 429 codes/types that mean "out of quota or credit", not "slow down".
QUOTA_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "quota_exceeded"}
)


class CircuitOpen(ProviderError):
    """The deployment's circuit breaker is open; selection moves on to the next one."""

    status = 503
    default_code = "CIRCUIT_OPEN"


class StreamInterrupted(ProviderError):
    """A stream failed after it had started; only an in-band error event can report it."""

    default_code = "STREAM_INTERRUPTED"


def error_body(err: GatewayError, fmt: ErrorFormat = "openai") -> dict[str, Any]:
    """Render ``err`` as the OpenAI error envelope, or the seed's legacy flat shape."""
    if fmt == "legacy":
        return {"error": err.message, "code": err.code}
    return {
        "error": {
            "message": err.message,
            "type": err.error_type,
            "param": err.param,
            "code": err.wire_code,
        }
    }


_STATUS_TO_ERROR: dict[int, type[GatewayError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
    415: UnsupportedMediaType,
}


def from_http_status(status: int, message: str) -> GatewayError:
    """Map an aiohttp HTTP exception raised by the router (404, 405, ...) to our hierarchy."""
    cls = _STATUS_TO_ERROR.get(status)
    if cls is not None:
        return cls(message)
    if 400 <= status < 500:
        return InvalidRequest(message, status=status)
    return InternalError(message, status=status)
