"""The API key of a WebSocket upgrade sent as a subprotocol (browsers cannot set headers)."""

from __future__ import annotations

from inference_server.websocket_auth import (
    MAX_PROTOCOL_HEADER,
    offered_protocols,
    subprotocol_authorization,
)

UPGRADE = {"Upgrade": "websocket"}


def test_the_key_subprotocol_becomes_a_bearer_authorization() -> None:
    headers = {**UPGRADE, "Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-1"}
    assert offered_protocols(headers) == ["realtime", "openai-insecure-api-key.sk-1"]
    assert subprotocol_authorization(headers) == "Bearer sk-1"


def test_only_on_an_upgrade_and_only_when_sane() -> None:
    protocol = {"Sec-WebSocket-Protocol": "openai-insecure-api-key.sk-1"}
    assert subprotocol_authorization(protocol) is None  # a plain HTTP request
    assert subprotocol_authorization({**UPGRADE, "Sec-WebSocket-Protocol": "realtime"}) is None
    huge = {**UPGRADE, "Sec-WebSocket-Protocol": "a," * MAX_PROTOCOL_HEADER}
    assert offered_protocols(huge) == []
    assert subprotocol_authorization(UPGRADE) is None
