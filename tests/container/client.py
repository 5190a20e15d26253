"""One blocking HTTP call for the container tier (urllib: the tier's tests are synchronous)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def call(
    url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body); GET without ``body``, else a JSON POST. A body that is not
    JSON (nginx's own 502 page) comes back as ``{"not_json": <its start>}``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, head, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    try:
        parsed = json.loads(raw or b"{}")
    except ValueError:
        parsed = {"not_json": raw[:200].decode(errors="replace")}
    return status, head, parsed
