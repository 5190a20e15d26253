"""Discovers provider plugins through the ``inference_server.providers`` entry-point group."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from inference_server.providers.base import PROVIDER_API_VERSION, ProviderPlugin

GROUP = "inference_server.providers"


class PluginLoadError(Exception):
    """A configured plugin is missing or broken; start-up must stop."""


@dataclass(frozen=True, slots=True)
class LoadedPlugin:
    """A plugin and where it came from (for diagnostics and start-up logs)."""

    plugin: ProviderPlugin
    distribution: str
    version: str


def _describe(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    return (dist.name, dist.version) if dist is not None else ("<unknown>", "?")


def discover(eps: list[EntryPoint] | None = None) -> dict[str, EntryPoint]:
    """Installed plugin names → entry points; two distributions claiming one name is an error."""
    found: dict[str, EntryPoint] = {}
    for ep in eps if eps is not None else list(entry_points(group=GROUP)):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginLoadError(
                f"provider plugin '{ep.name}' is provided by both "
                f"{_describe(found[ep.name])[0]} and {_describe(ep)[0]}"
            )
        found[ep.name] = ep
    return found


def load_plugins(wanted: set[str], eps: list[EntryPoint] | None = None) -> dict[str, LoadedPlugin]:
    """Load every plugin named in ``wanted``; fail with the list of installed ones otherwise."""
    available = discover(eps)
    missing = sorted(wanted - available.keys())
    if missing:
        installed = ", ".join(sorted(available)) or "none"
        raise PluginLoadError(
            f"provider plugin(s) not installed: {', '.join(missing)} (installed: {installed})"
        )
    loaded: dict[str, LoadedPlugin] = {}
    for name in sorted(wanted):
        ep = available[name]
        dist, version = _describe(ep)
        try:
            obj = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginLoadError(
                f"provider plugin '{name}' from {dist} {version} failed to load: {exc!r}"
            ) from exc
        if not isinstance(obj, ProviderPlugin):
            raise PluginLoadError(
                f"entry point '{name}' of {dist} is {type(obj).__name__}, not a ProviderPlugin"
            )
        if obj.name != name:
            raise PluginLoadError(f"entry point '{name}' of {dist} declares name '{obj.name}'")
        if obj.api_version != PROVIDER_API_VERSION:
            raise PluginLoadError(
                f"plugin '{name}' ({dist} {version}) targets provider API {obj.api_version}; "
                f"this gateway speaks {PROVIDER_API_VERSION}: upgrade the plugin or the gateway"
            )
        loaded[name] = LoadedPlugin(obj, dist, version)
    return loaded


def installed_plugins() -> list[str]:
    """Names of installed provider plugins, for messages and ``--check-config``."""
    return sorted(discover())
