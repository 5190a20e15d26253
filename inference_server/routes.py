"""Thin HTTP handlers; chat goes through pipeline.py."""

from __future__ import annotations

import orjson
from aiohttp import web

from inference_server.keys import HEALTH, REGISTRY, SETTINGS
from inference_server.pipeline import chat_completions

_OK = orjson.dumps({"message": "Ok"})


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


async def root(request: web.Request) -> web.Response:
    """GET / — liveness of the gateway process itself."""
    return web.Response(body=_OK, content_type="application/json")


async def health(request: web.Request) -> web.Response:
    """GET /health — healthy only while the providers answer (503 otherwise)."""
    settings = request.app[SETTINGS]
    states = await request.app[HEALTH].check()
    healthy = all(ok for ok, _ in states.values())
    primary = settings.primary_provider
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "provider": primary.plugin,
        "http_config": dict(settings.http_config),
        "providers": {
            name: {
                "status": "healthy" if ok else "unhealthy",
                "plugin": settings.providers[name].plugin,
                "detail": detail,
            }
            for name, (ok, detail) in states.items()
        },
    }
    return _json(body, 200 if healthy else 503)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    return _json({"object": "list", "data": await request.app[REGISTRY].list_models()})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id} (ids may contain '/', e.g. 'meta/llama-3')."""
    return _json(await request.app[REGISTRY].get_model(request.match_info["model_id"]))


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/", root)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_post("/v1/chat/completions", chat_completions)
