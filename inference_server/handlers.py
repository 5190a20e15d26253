"""Thin HTTP handlers and their URL table; chat goes through pipeline.py (routing.py holds
model routes, this module holds HTTP routes)."""

from __future__ import annotations

import hashlib
import hmac

import orjson
from aiohttp import web

from inference_server.endpoints.completions import completions
from inference_server.endpoints.embeddings import embeddings
from inference_server.endpoints.responses import delete_response, get_response, responses
from inference_server.errors import Forbidden, Unauthorized
from inference_server.keys import CTX, METRICS, SETTINGS
from inference_server.pipeline import chat_completions
from inference_server.server import expect_continue

_OK = orjson.dumps({"message": "Ok"})


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def root(request: web.Request) -> web.Response:
    """GET / — liveness of the gateway process itself."""
    return web.Response(body=_OK, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """GET /health — healthy, degraded (a deployment is out) or unhealthy (503: a route has none)."""
    runtime = request[CTX].runtime
    settings = runtime.settings
    status, details = await runtime.health.report()
    for name, info in details["providers"].items():
        info["plugin"] = settings.providers[name].plugin
    # Probe details quote upstream error text: a secret echoed there never reaches the client.
    details = settings.scrubber.scrub_value(details)
    body = {
        "status": status,
        "provider": settings.primary_provider.plugin,
        "http_config": dict(settings.http_config),
        **details,
    }
    return _json(body, 503 if status == "unhealthy" else 200)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    return _json({"object": "list", "data": await request[CTX].runtime.router.list_models()})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id} (ids may contain '/', e.g. 'meta/llama-3')."""
    return _json(await request[CTX].runtime.router.get_model(request.match_info["model_id"]))


def require_admin(request: web.Request) -> None:
    """Admin endpoints need ``Authorization: Bearer <server.admin_token>``; off when unset."""
    token = request[CTX].runtime.settings.admin_token  # the current one after a reload
    if not token:
        raise Forbidden("Admin endpoints are disabled: set server.admin_token to enable them")
    given = request.headers.get("Authorization", "")
    # Header bytes that are not UTF-8 arrive as surrogate escapes: encode them back rather than
    # fail (a UnicodeEncodeError here was a 500).  Digests compare in constant time whatever
    # the lengths.
    if not given.lower().startswith("bearer ") or not hmac.compare_digest(
        _digest(given[7:]), _digest(token)
    ):
        raise Unauthorized("Admin endpoints need 'Authorization: Bearer <admin token>'")


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


async def admin_experiments(request: web.Request) -> web.Response:
    """GET /admin/experiments — per-variant and shadow counters of this worker process."""
    require_admin(request)
    router = request[CTX].runtime.router
    return _json(
        {
            "object": "list",
            "scope": "this worker process",
            "data": {e.name: e.snapshot() for e in router.experiments.values()},
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics — Prometheus text format (all workers' values in multiprocess mode)."""
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup_routes(app: web.Application) -> None:
    if app[SETTINGS].metrics.enabled:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/", root)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions, expect_handler=expect_continue)
    app.router.add_post("/v1/embeddings", embeddings, expect_handler=expect_continue)
    app.router.add_post("/v1/completions", completions, expect_handler=expect_continue)
    app.router.add_post("/v1/responses", responses, expect_handler=expect_continue)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/admin/experiments", admin_experiments)
    from inference_server.admin import setup_admin_routes  # (admin imports require_admin)

    setup_admin_routes(app)  # issue 12: /admin/keys, /admin/usage
    from inference_server.reload import setup_routes as setup_lifecycle_routes

    setup_lifecycle_routes(app)  # issue 16: /health/live, /health/ready, /admin/reload
