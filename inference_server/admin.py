"""Admin API for keys and usage (bearer ``server.admin_token``, constant-time compare).

``POST /admin/keys`` makes a virtual key and shows it once (only its SHA-256 is stored);
``GET /admin/keys`` and ``/admin/keys/{id}`` list keys without secrets, with their usage so
far; ``PATCH`` changes limits, models, budget, expiry or ``disabled``; ``DELETE`` removes a
virtual key (every process within ``auth.key_refresh_secs``).  ``GET /admin/usage`` reads the
ledger as JSON or CSV.  Static keys (settings) are listed but changed only in settings.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from inference_server.auth import MAX_VIRTUAL_KEYS, digest
from inference_server.errors import InvalidRequest, NotFound, ServiceUnavailable
from inference_server.handlers import require_admin
from inference_server.keys import CTX
from inference_server.server import read_body
from inference_server.tenancy import STATE_ERRORS, Tenancy
from inference_server.tenancy_config import (
    KEY_NAME,
    Budget,
    KeySpec,
    key_id,
    parse_budget,
    parse_limit,
    parse_models,
)

MAX_ADMIN_BODY = 64 * 1024
_CREATE_FIELDS = {"name", "models", "rpm", "tpm", "max_parallel", "budget", "expires_at"}
_PATCH_FIELDS = {"models", "rpm", "tpm", "max_parallel", "budget", "expires_at", "disabled"}


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _tenancy(request: web.Request) -> Tenancy:
    require_admin(request)
    t = request[CTX].runtime.tenancy  # the current one after a reload (issue 16)
    if t is None:
        raise NotFound(
            "Keys and usage are off: set auth.enabled: true (or limits) to use /admin/keys"
        )
    return t


async def _body(request: web.Request, fields: set[str]) -> dict[str, Any]:
    raw = await read_body(request, max_bytes=MAX_ADMIN_BODY, total_secs=10, idle_secs=5)
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"Malformed JSON body: {exc}", code="INVALID_JSON") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidRequest(
            f"Unknown field(s): {', '.join(u[:40] for u in unknown[:5])} "
            f"(known: {', '.join(sorted(fields))})",
            param=unknown[0][:40],
        )
    return body


def _expiry(value: Any) -> float | None:
    """``expires_at``: Unix seconds or an ISO 8601 time (UTC unless it says otherwise)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            return when.timestamp()
    raise InvalidRequest(
        "expires_at: Unix seconds or an ISO 8601 time like 2026-12-31T00:00:00Z",
        param="expires_at",
    )


def _fields(body: dict[str, Any], base: KeySpec) -> KeySpec:
    problems: list[str] = []
    limit_tree = {k: body.get(k, getattr(base.limit, k)) for k in ("rpm", "tpm", "max_parallel")}
    limit = parse_limit(limit_tree, "body", problems)
    models = parse_models(body["models"], "models", problems) if "models" in body else base.models
    budget: Budget | None = (
        parse_budget(body["budget"], "budget", problems) if "budget" in body else base.budget
    )
    disabled = body.get("disabled", base.disabled)
    if not isinstance(disabled, bool):
        problems.append("disabled: must be true or false")
    if problems:
        raise InvalidRequest("; ".join(problems))
    expires = _expiry(body["expires_at"]) if "expires_at" in body else base.expires_at
    return KeySpec(
        id=base.id,
        name=base.name,
        key_sha256=base.key_sha256,
        models=models,
        limit=limit,
        budget=budget,
        expires_at=expires,
        disabled=disabled,
        virtual=True,
        created_at=base.created_at,
    )


async def _save(t: Tenancy, spec: KeySpec, delete: bool = False) -> None:
    try:
        if delete:
            await t.keys.delete(spec)
        else:
            await t.keys.put(spec)
    except STATE_ERRORS as exc:
        t.failed("admin keys", exc)
        raise ServiceUnavailable(
            "The state backend (Redis) is unreachable", retry_after=1
        ) from None


async def create_key(request: web.Request) -> web.Response:
    """POST /admin/keys → 201 with the key (shown only here)."""
    t = _tenancy(request)
    body = await _body(request, _CREATE_FIELDS)
    name = body.get("name")
    if not isinstance(name, str) or not KEY_NAME.match(name):
        raise InvalidRequest("name: 1-64 letters, digits or _.:@- (required)", param="name")
    if len(t.keys.virtual) >= MAX_VIRTUAL_KEYS:
        raise InvalidRequest(f"At most {MAX_VIRTUAL_KEYS} virtual keys")
    plain = "sk-" + secrets.token_urlsafe(32)
    d = digest(plain)
    base = KeySpec(id=key_id(d), name=name, key_sha256=d, virtual=True, created_at=time.time())
    spec = _fields(body, base)
    await _save(t, spec)
    return _json({**spec.public(), "key": plain}, status=201)


async def _usage_by_key(t: Tenancy) -> dict[str, dict[str, int]]:
    today = dt.datetime.now(dt.UTC).date()
    try:
        rows = await t.ledger.query(None, None, today.replace(day=1), today)
    except STATE_ERRORS as exc:
        t.failed("usage read", exc)
        return {}
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        u = out.setdefault(row["key_id"], {"month_tokens": 0, "today_tokens": 0, "requests": 0})
        u["month_tokens"] += row["total_tokens"]
        u["requests"] += row["requests"]
        if row["day"] == today.isoformat():
            u["today_tokens"] += row["total_tokens"]
    return out


def _public(spec: KeySpec, usage: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        **spec.public(),
        "usage": usage.get(spec.id, {"month_tokens": 0, "today_tokens": 0, "requests": 0}),
    }


async def list_keys(request: web.Request) -> web.Response:
    t = _tenancy(request)
    usage = await _usage_by_key(t)
    return _json({"object": "list", "data": [_public(k, usage) for k in t.keys.all()]})


def _find(t: Tenancy, request: web.Request, *, virtual: bool = False) -> KeySpec:
    kid = request.match_info["key_id"][:64]
    spec = t.keys.by_id(kid)
    if spec is None:
        raise NotFound(f"No key with id '{kid}'", code="KEY_NOT_FOUND")
    if virtual and not spec.virtual:
        raise InvalidRequest(
            f"Key '{spec.name}' comes from settings (auth.keys); change it there",
            code="STATIC_KEY",
            status=409,
        )
    return spec


async def get_key(request: web.Request) -> web.Response:
    t = _tenancy(request)
    spec = _find(t, request)
    return _json(_public(spec, await _usage_by_key(t)))


async def patch_key(request: web.Request) -> web.Response:
    t = _tenancy(request)
    spec = _find(t, request, virtual=True)
    body = await _body(request, _PATCH_FIELDS)
    updated = _fields(body, spec)
    await _save(t, updated)
    return _json(updated.public())


async def delete_key(request: web.Request) -> web.Response:
    t = _tenancy(request)
    spec = _find(t, request, virtual=True)
    await _save(t, spec, delete=True)
    return web.Response(status=204)


def _date(value: str | None, default: dt.date, name: str) -> dt.date:
    if not value:
        return default
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        raise InvalidRequest(f"{name}: a date like 2026-11-26", param=name) from None


async def usage(request: web.Request) -> web.StreamResponse:
    """GET /admin/usage?key=&model=&from=&to=&format=json|csv (key: id or name)."""
    t = _tenancy(request)
    q = request.query
    today = dt.datetime.now(dt.UTC).date()
    end = _date(q.get("to"), today, "to")
    start = _date(q.get("from"), end - dt.timedelta(days=30), "from")
    if (end - start).days > 400:
        raise InvalidRequest("from/to: at most 400 days", param="from")
    key = q.get("key")
    key_filter = None
    if key:
        spec = t.keys.by_id(key[:64]) or next((k for k in t.keys.all() if k.name == key), None)
        key_filter = spec.id if spec is not None else key[:64]
    model = q.get("model")
    try:
        await t.ledger.flush()
        rows = await t.ledger.query(key_filter, model[:256] if model else None, start, end)
    except STATE_ERRORS as exc:
        t.failed("usage read", exc)
        raise ServiceUnavailable(
            "The state backend (Redis) is unreachable", retry_after=1
        ) from None
    names = {k.id: k.name for k in t.keys.all()}
    for row in rows:
        row["key"] = names.get(row["key_id"], row["key_id"])
    if q.get("format") == "csv":
        out = io.StringIO()
        columns = [
            "day",
            "key",
            "key_id",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "requests",
            "estimated_requests",
        ]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return web.Response(text=out.getvalue(), content_type="text/csv")
    return _json(
        {
            "object": "list",
            "from": start.isoformat(),
            "to": end.isoformat(),
            "scope": "all processes" if t.redis_limiter is not None else "this worker process",
            "data": rows,
        }
    )


def setup_admin_routes(app: web.Application) -> None:
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_get("/admin/keys/{key_id}", get_key)
    app.router.add_patch("/admin/keys/{key_id}", patch_key)
    app.router.add_delete("/admin/keys/{key_id}", delete_key)
    app.router.add_get("/admin/usage", usage)
