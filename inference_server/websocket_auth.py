"""The API key of a WebSocket upgrade sent as a subprotocol (browsers cannot set headers).

A browser's ``new WebSocket(url, ["openai-insecure-api-key.<key>"])`` is the only way it can
send a key on the upgrade; OpenAI's Realtime API accepts the same form.  Kept apart from
websocket.py (no app imports) so ``tenancy.access_middleware`` can use it without an import
cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

#: The subprotocol prefix that carries an API key.
KEY_PROTOCOL: Final = "openai-insecure-api-key."
#: A longer Sec-WebSocket-Protocol header is not looked into (keys are far shorter).
MAX_PROTOCOL_HEADER: Final = 4096


def offered_protocols(headers: Mapping[str, str]) -> list[str]:
    """The subprotocols a WebSocket upgrade offers (none for anything else, or when absurd)."""
    if headers.get("Upgrade", "").lower() != "websocket":
        return []
    header = headers.get("Sec-WebSocket-Protocol")
    if not header or len(header) > MAX_PROTOCOL_HEADER:
        return []
    return [p.strip() for p in header.split(",") if p.strip()]


def subprotocol_authorization(headers: Mapping[str, str]) -> str | None:
    """``Bearer <key>`` for a WebSocket upgrade offering ``openai-insecure-api-key.<key>``."""
    for proto in offered_protocols(headers):
        if proto.startswith(KEY_PROTOCOL):
            return "Bearer " + proto[len(KEY_PROTOCOL) :]
    return None
