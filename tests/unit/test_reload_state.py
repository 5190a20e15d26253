"""Issue 16: what a reload carries over (``Router.adopt``) and what it reports as needing a
restart (``reload.needs_restart``), without a server."""

from __future__ import annotations

from typing import Any

from inference_server_mock import MockProvider

from inference_server.providers.base import Provider
from inference_server.reload import needs_restart
from inference_server.routing import Router
from inference_server.settings import Settings
from tests.conftest import SettingsFactory

MOCK = {"plugin": "mock", "base_url": "http://127.0.0.1:9/v1"}


def table(weight: float = 1.0) -> dict[str, Any]:
    """Two routes whose deployments share one breaker (same provider and upstream model)."""
    return {
        "providers": {"p": MOCK, "q": {**MOCK, "base_url": "http://127.0.0.1:10/v1"}},
        "models": {
            "one": {"provider": "p", "upstream_model": "m"},
            "two": {
                "strategy": "weighted",
                "deployments": [{"provider": "p", "upstream_model": "m", "weight": weight}],
            },
            "other": {"provider": "q", "upstream_model": "m"},
        },
        "routing": {"breaker": {"consecutive_failures": 1, "cooldown_secs": 60}},
        "experiments": {
            "exp": {"model": "ab", "variants": {"a": {"model": "one"}, "b": {"model": "other"}}}
        },
    }


def router(settings: Settings, reuse: Router | None = None) -> Router:
    """A router; providers whose settings are unchanged are reused as a reload does."""
    providers: dict[str, Provider] = {}
    for name, config in settings.providers.items():
        old = reuse.providers.get(name) if reuse is not None else None
        providers[name] = (
            old if old is not None and old.config == config else MockProvider(None, config)  # type: ignore[arg-type]
        )
    return Router(settings, providers)


def open_breakers(r: Router) -> None:
    for dep in r.deployments:
        dep.breaker.record_failure("PROVIDER_ERROR", "down")


def test_unchanged_deployments_keep_their_breaker_and_changed_ones_start_fresh(
    make_settings: SettingsFactory,
) -> None:
    old = router(make_settings(table()))
    open_breakers(old)
    old.experiments["ab"].stats["a"].record(0.1, False, None)

    # Route "two" changes the weight of the shared deployment p/m; q/m is unchanged.
    new = router(make_settings(table(weight=2.0)), reuse=old)
    carried = new.adopt(old)
    assert carried == ["q/m"]
    states = {dep.id: dep.breaker.state for dep in new.deployments}
    assert states == {"p/m": "closed", "q/m": "open"}
    # The experiment did not change: its counters go on.
    assert new.experiments["ab"] is old.experiments["ab"]


def test_breaker_settings_changed_start_every_breaker_fresh(
    make_settings: SettingsFactory,
) -> None:
    old = router(make_settings(table()))
    open_breakers(old)
    cfg = table()
    cfg["routing"]["breaker"]["cooldown_secs"] = 30
    new = router(make_settings(cfg), reuse=old)
    new.adopt(old)
    assert {dep.breaker.state for dep in new.deployments} == {"closed"}


def test_a_provider_with_changed_settings_is_new_and_carries_nothing(
    make_settings: SettingsFactory,
) -> None:
    old = router(make_settings(table()))
    open_breakers(old)
    cfg = table()
    cfg["providers"]["q"] = {**MOCK, "base_url": "http://127.0.0.1:11/v1"}
    new = router(make_settings(cfg), reuse=old)
    assert new.providers["q"] is not old.providers["q"]
    assert new.providers["p"] is old.providers["p"]
    assert new.adopt(old) == ["p/m"]
    states = {dep.id: dep.breaker.state for dep in new.deployments}
    assert states == {"p/m": "open", "q/m": "closed"}


def test_what_needs_a_restart(make_settings: SettingsFactory) -> None:
    base = {"inference": {"provider": "mock"}}
    old = make_settings(base)
    same = make_settings({**base, "inference": {"provider": "mock", "default_model": "x"}})
    assert needs_restart(old, same, tenancy=False) == []
    moved = make_settings(
        {
            **base,
            "server": {"port": 4321, "workers": 2, "drain_delay_secs": 3},
            "logging": {"level": "debug"},
            "http_client": {"pool_size": 10},
            "auth": {"enabled": True},
        }
    )
    assert needs_restart(old, moved, tenancy=False) == [
        "server.port",
        "server.workers",
        "server.drain_delay_secs",
        "http_client",
        "logging",
        "auth/limits/cors (turned on: their hooks are installed at start-up)",
    ]
    # With the hooks installed at start-up, turning auth on is live.
    assert "auth/limits/cors" not in " ".join(needs_restart(old, moved, tenancy=True))
