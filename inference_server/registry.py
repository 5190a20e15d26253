"""Provider instances and the model table: which provider serves a public model name."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from inference_server.errors import GatewayError, InvalidRequest, ModelNotFound
from inference_server.providers.base import Provider, ProviderConfig
from inference_server.settings import Settings


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: a provider instance and the model id it knows."""

    public_model: str
    provider: Provider
    config: ProviderConfig
    upstream_model: str


class Registry:
    """Resolves model names and lists models (cached briefly, concurrent misses coalesced)."""

    def __init__(self, settings: Settings, providers: dict[str, Provider]) -> None:
        self.settings = settings
        self.providers = providers
        self._default = next(iter(providers.values()))
        self._allowed = frozenset(settings.allowed_models)
        self._created = int(time.time())
        self._models_cache: tuple[float, list[dict[str, Any]]] | None = None
        self._models_lock = asyncio.Lock()

    def resolve(self, model: str) -> Target:
        """Map a public model name to a target, enforcing ``allowed_models`` and the table."""
        if self._allowed and model not in self._allowed:
            available = ", ".join(self.settings.allowed_models)
            raise InvalidRequest(
                f"Model '{model}' is not in the allowed list. Available models: {available}",
                code="MODEL_NOT_ALLOWED",
                param="model",
            )
        routes = self.settings.models
        if routes:
            route = routes.get(model)
            if route is None:
                raise ModelNotFound(
                    f"The model '{model}' does not exist. Available models: " + ", ".join(routes),
                    param="model",
                )
            provider = self.providers[route.provider]
            return Target(model, provider, provider.config, route.upstream_model)
        return Target(model, self._default, self._default.config, model)

    def _entry(self, model_id: str, owned_by: str, created: int | None = None) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": created if created is not None else self._created,
            "owned_by": owned_by,
        }

    async def list_models(self) -> list[dict[str, Any]]:
        """The allowed list, else the model table, else the provider's own list (cached)."""
        if self.settings.allowed_models:
            if self.settings.models:
                return [
                    self._entry(m, self.settings.models[m].provider)
                    for m in self.settings.allowed_models
                    if m in self.settings.models
                ]
            return [self._entry(m, self._default.config.name) for m in self.settings.allowed_models]
        if self.settings.models:
            return [self._entry(name, r.provider) for name, r in self.settings.models.items()]
        now = time.monotonic()
        cached = self._models_cache
        if cached is not None and now - cached[0] < self.settings.models_cache_secs:
            return cached[1]
        async with self._models_lock:
            cached = self._models_cache
            if (
                cached is not None
                and time.monotonic() - cached[0] < self.settings.models_cache_secs
            ):
                return cached[1]
            infos = await self._default.list_models()
            models = [self._entry(i.id, self._default.config.name, i.created) for i in infos]
            self._models_cache = (time.monotonic(), models)
            return models

    async def get_model(self, model_id: str) -> dict[str, Any]:
        """One model by id, or a 404 ``MODEL_NOT_FOUND``."""
        for entry in await self.list_models():
            if entry["id"] == model_id:
                return entry
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")

    async def aclose(self) -> None:
        """Close every provider (never the shared session, which the app owns)."""
        for provider in self.providers.values():
            try:
                await provider.aclose()
            except GatewayError:
                continue
