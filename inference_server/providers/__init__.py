"""The public API for provider plugins: import only from here.

See docs/plugins.md for how to write, package and test a provider.
"""

from inference_server.errors import (
    GatewayError,
    InvalidRequest,
    ProviderAuthFailed,
    ProviderBadResponse,
    ProviderConnectionFailed,
    ProviderError,
    ProviderQuotaExceeded,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    StreamInterrupted,
)
from inference_server.providers.base import (
    PROVIDER_API_VERSION,
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    HealthStatus,
    ModelInfo,
    Provider,
    ProviderConfig,
    ProviderFactory,
    ProviderPlugin,
    Setting,
    Timeouts,
)
from inference_server.providers.openai_compat import (
    OpenAICompatibleProvider,
    decode_object,
    map_client_exception,
    map_upstream_status,
    parse_retry_after,
    stream_failure,
)
from inference_server.providers.sse import SSEDecoder, sse_events
from inference_server.scrub import Scrubber, provider_secrets, scrub_stream

__all__ = [
    "PROVIDER_API_VERSION",
    "CallContext",
    "ChatChunk",
    "ChatRequest",
    "ChatResponse",
    "GatewayError",
    "HealthStatus",
    "InvalidRequest",
    "ModelInfo",
    "OpenAICompatibleProvider",
    "Provider",
    "ProviderAuthFailed",
    "ProviderBadResponse",
    "ProviderConfig",
    "ProviderConnectionFailed",
    "ProviderError",
    "ProviderFactory",
    "ProviderPlugin",
    "ProviderQuotaExceeded",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderTimeout",
    "SSEDecoder",
    "Scrubber",
    "Setting",
    "StreamInterrupted",
    "Timeouts",
    "decode_object",
    "map_client_exception",
    "map_upstream_status",
    "parse_retry_after",
    "provider_secrets",
    "scrub_stream",
    "sse_events",
    "stream_failure",
]
