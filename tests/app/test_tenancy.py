"""Keys, rate limits, usage, budgets, the admin API and CORS, in one process (memory and Redis)."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

from inference_server.errors import RateLimited
from inference_server.limits import MemoryLimiter, Scope, compile_plan, fmt_duration
from inference_server.settings import ConfigError
from inference_server.tenancy import TENANCY, access_middleware
from inference_server.tenancy_config import Limit
from tests.support.fake_upstream import FakeUpstream
from tests.support.redis_server import RedisServer

KEY = "sk-test-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"
ADMIN = "admin-token-for-tests"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keyed(**key: Any) -> dict[str, Any]:
    """Settings with auth on and one static key ``team`` (``key`` fields added)."""
    return {
        "auth": {"enabled": True, "keys": {"team": {"key_sha256": sha(KEY), **key}}},
        "server": {"admin_token": ADMIN},
    }


async def chat(client: Any, key: str | None = KEY, **body: Any) -> Any:
    return await client.post(
        "/v1/chat/completions", json={**CHAT, **body}, headers=auth(key) if key else {}
    )


# --- off by default ------------------------------------------------------------------------


async def test_off_by_default_adds_nothing_to_the_request_path(gateway_for) -> None:
    client = await gateway_for()
    assert access_middleware not in client.app.middlewares
    assert TENANCY not in client.app
    resp = await chat(client, key=None)
    assert resp.status == 200
    assert not any(h.lower().startswith("x-ratelimit") for h in resp.headers)


def logged(fn: Any) -> str:
    """What ``fn()`` logs through loguru at warning level and above."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="WARNING", format="{message}")
    try:
        fn()
    finally:
        logger.remove(sink)
    return "".join(lines)


def test_public_bind_without_auth_warns(make_settings) -> None:
    from inference_server.tenancy import public_bind_warning

    public = make_settings({"server": {"host": "0.0.0.0"}})
    assert "anyone who can reach this port" in logged(lambda: public_bind_warning(public))
    local = make_settings({"server": {"host": "127.0.0.1"}})
    assert logged(lambda: public_bind_warning(local)) == ""
    keyed_public = make_settings({"server": {"host": "0.0.0.0"}, **keyed()})
    assert logged(lambda: public_bind_warning(keyed_public)) == ""


def test_startup_says_memory_limits_are_approximate_and_virtual_keys_temporary(
    make_settings,
) -> None:
    from inference_server.tenancy import startup_notes

    text = logged(lambda: startup_notes(make_settings({**keyed(rpm=10), "server": {"workers": 2}})))
    assert "each worker enforces 1/2 of every limit" in text
    assert "virtual keys are kept in this process" in text
    assert logged(lambda: startup_notes(make_settings({}))) == ""


# --- keys ----------------------------------------------------------------------------------


async def test_missing_wrong_and_right_keys(gateway_for) -> None:
    client = await gateway_for(**keyed())
    for key in (None, "sk-wrong-key-000000000", "x" * 5000):
        resp = await chat(client, key=key)
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "INVALID_API_KEY"
        assert body["error"]["type"] == "invalid_request_error"
        assert resp.headers["x-should-retry"] == "false"
        assert "sk-wrong" not in str(body)
    resp = await client.get("/v1/models")  # every /v1/* path needs the key
    assert resp.status == 401
    assert (await chat(client)).status == 200
    assert (await client.get("/v1/models", headers=auth())).status == 200
    assert (await client.get("/health")).status == 200  # not /v1/*


async def test_key_from_a_secret(gateway_for, make_settings, make_gateway, fake_upstream) -> None:
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url},
            "auth": {"enabled": True, "keys": {"app": {"key": "@secret app_key"}}},
        },
        secrets={"default": {"secrets": {"app_key": OTHER}}},
    )
    client = await make_gateway(settings)
    assert (await chat(client, key=OTHER)).status == 200
    assert (await chat(client, key=KEY)).status == 401


def test_bad_key_settings_are_named(make_settings) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(
            {
                "auth": {
                    "enabled": True,
                    "keys": {
                        "a": {"key_sha256": "nothex"},
                        "b": {
                            "key_sha256": sha(KEY),
                            "rpm": 0,
                            "budget": {"tokens": 5, "period": "year"},
                        },
                    },
                },
                "limits": {"global": {"rpn": 5}},
            }
        )
    problems = "\n".join(info.value.problems)
    assert "auth.keys.a.key_sha256: must be 64 hex digits" in problems
    assert "auth.keys.b.rpm: must be an integer" in problems
    assert "auth.keys.b.budget.period" in problems
    assert "limits.global.rpn: unknown key" in problems


async def test_model_not_allowed_for_key(gateway_for) -> None:
    client = await gateway_for(**keyed(models=["llama-*"]))
    resp = await chat(client, model="gpt-oss-20b")
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["code"] == "MODEL_NOT_ALLOWED_FOR_KEY"
    assert body["error"]["param"] == "model"
    assert (await chat(client, model="llama-2-7b")).status == 200


# --- rate limits ---------------------------------------------------------------------------


def test_gcra_admits_the_limit_then_one_per_interval() -> None:
    now = [1000.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    plan = compile_plan([Scope("key:a", Limit(rpm=6))])
    admitted = [limiter.admit(plan, 1).ok for _ in range(8)]
    assert admitted == [True] * 6 + [False] * 2
    blocked = limiter.admit(plan, 1)
    assert blocked.reason == "rpm"
    assert blocked.retry_after == pytest.approx(10.0)  # 60 s / 6
    now[0] += 9.9
    assert not limiter.admit(plan, 1).ok
    now[0] += 0.1
    ok = limiter.admit(plan, 1)
    assert ok.ok
    assert ok.requests is not None
    assert ok.requests.remaining == 0
    # Across any window edge: never more than the limit within 60 s.
    now[0] += 60
    assert sum(limiter.admit(plan, 1).ok for _ in range(20)) == 6


def test_the_tightest_limit_names_the_reason_and_the_headers() -> None:
    now = [0.0]
    limiter = MemoryLimiter(clock=lambda: now[0])
    plan = compile_plan(
        [Scope("global", Limit(rpm=100, tpm=1000)), Scope("key:a", Limit(rpm=2, tpm=5000))]
    )
    first = limiter.admit(plan, 600)
    assert first.ok
    assert first.requests is not None
    assert first.tokens is not None
    assert (first.requests.limit, first.requests.remaining) == (2, 1)
    assert (first.tokens.limit, first.tokens.remaining) == (1000, 400)
    second = limiter.admit(plan, 600)
    assert (second.ok, second.reason) == (False, "tpm")
    assert second.retry_after == pytest.approx(12.0)  # 200 tokens short at 1000/min


@pytest.mark.parametrize("seed", range(40))
def test_fast_admission_agrees_with_the_exact_path(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory limiter's fast path (cells, two loops, clamps on the tightest only) and its
    exact plan-order path give the same decisions, headers and TATs on random workloads."""
    import random

    from inference_server import limits

    rnd = random.Random(seed)
    scopes = [
        Scope(
            name,
            Limit(
                rnd.choice([None, 1, 2, 5, 100, 10**9]),
                rnd.choice([None, 10, 500, 1000, 10**6, 10**9]),
                rnd.choice([None, 1, 2, 3]),
            ),
        )
        for name in ("global", "model:m", "key:k")
        if rnd.random() < 0.8
    ]
    now = [rnd.choice([0.0, 1000.0, 1e6])]
    plan = compile_plan(scopes)
    fast, exact = MemoryLimiter(clock=lambda: now[0]), MemoryLimiter(clock=lambda: now[0])
    fast_bound, exact_bound = fast.bind(plan), exact.bind(plan)
    held: list[tuple[tuple[str, ...], int]] = []

    def seen(d: limits.Decision) -> tuple[Any, ...]:
        dims = [(x.limit, x.remaining, x.reset_secs) if x else None for x in (d.requests, d.tokens)]
        return (d.ok, d.reason, d.retry_after, *dims, d.slots)

    for _ in range(150):
        op = rnd.random()
        if op < 0.6:
            tokens, budget = rnd.choice([1, 8, 300, 600, 5000]), rnd.choice([None, None, 5, 0])
            got = fast.admit(plan, tokens, budget, fast_bound)
            with monkeypatch.context() as m:
                m.setattr(limits, "EDGE_SECS", float("inf"))  # every admission: exact path
                want = exact.admit(plan, tokens, budget, exact_bound)
            assert seen(got) == seen(want)
            if got.ok:
                held.append((got.slots, tokens))
        elif op < 0.85 and held:
            slots, tokens = held.pop(rnd.randrange(len(held)))
            delta = rnd.choice([0, -tokens, 5, -3])
            fast.settle(plan, delta, slots, fast_bound)
            exact.settle(plan, delta, slots, exact_bound)
        else:
            now[0] += rnd.choice([0.001, 0.5, 5, 30, 61])
        assert dict(fast.tats) == dict(exact.tats)


def test_reset_format_is_openais() -> None:
    assert fmt_duration(0.012) == "12ms"
    assert fmt_duration(1.0) == "1s"
    assert fmt_duration(360) == "6m0s"


async def test_rpm_limit_429_with_retry_after_and_headers(gateway_for) -> None:
    client = await gateway_for(**keyed(rpm=3))
    seen = []
    for _ in range(3):
        resp = await chat(client)
        assert resp.status == 200
        seen.append(int(resp.headers["x-ratelimit-remaining-requests"]))
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
    assert seen == [2, 1, 0]
    resp = await chat(client)
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "RATE_LIMITED"
    assert body["error"]["type"] == RateLimited.type
    assert resp.headers["x-should-retry"] == "true"
    assert 1 <= int(resp.headers["Retry-After"]) <= 20
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"


async def test_limits_per_model_global_and_default_key(gateway_for) -> None:
    client = await gateway_for(
        **keyed(),
        limits={"models": {"llama-2-7b": {"rpm": 1}}, "global": {"rpm": 3}},
    )
    assert (await chat(client, model="llama-2-7b")).status == 200
    assert (await chat(client, model="llama-2-7b")).status == 429
    assert (await chat(client)).status == 200
    assert (await chat(client)).status == 200
    assert (await chat(client)).status == 429  # global: 3 admitted in all


async def test_tpm_reserves_the_estimate_and_settles_to_real_usage(gateway_for) -> None:
    client = await gateway_for(**keyed(tpm=1000))
    resp = await chat(client, max_tokens=500)
    assert resp.status == 200
    # reserved: prompt estimate (1 + 4 + 3 = 8) + 500; the header says what was left then
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - 508
    t = client.app[TENANCY]
    # settled to the upstream's usage (19 tokens): the next admission sees 1000 - 19 - reserve
    resp = await chat(client, max_tokens=100)
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - 19 - 108
    assert t.limiter.tats


@pytest.mark.parametrize("include_usage", [True, False])
async def test_tpm_settles_streams(gateway_for, include_usage: bool) -> None:
    client = await gateway_for(**keyed(tpm=1000))
    body: dict[str, Any] = {"stream": True, "max_tokens": 500}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await chat(client, **body)
    assert resp.status == 200
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - 508
    await resp.read()
    # the upstream's usage chunk (5 + 3) with include_usage; else the estimate: prompt 8 + 3
    # content deltas
    used = 8 if include_usage else 11
    resp = await chat(client, max_tokens=100)
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - 108


async def test_failed_request_refunds_its_reservation(gateway_for, fake_upstream) -> None:
    from tests.support.fake_upstream import Action

    client = await gateway_for(inference={"max_retries": 0}, **keyed(tpm=1000))
    fake_upstream.script(Action(kind="status", status=400, body={"error": {"message": "no"}}))
    resp = await chat(client, max_tokens=500)
    assert resp.status == 400
    resp = await chat(client, max_tokens=100)
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - 108


async def test_max_parallel(gateway_for, fake_upstream: FakeUpstream) -> None:
    from tests.support.fake_upstream import Action

    client = await gateway_for(**keyed(max_parallel=2))
    fake_upstream.always = Action(delay=0.3)
    results = await asyncio.gather(*(chat(client) for _ in range(3)))
    assert sorted(r.status for r in results) == [200, 200, 429]
    fake_upstream.always = None
    assert (await chat(client)).status == 200  # the slots were freed


async def test_budget_blocks_at_the_limit(gateway_for) -> None:
    client = await gateway_for(**keyed(budget={"tokens": 30, "period": "day"}))
    assert (await chat(client)).status == 200  # 19 tokens
    assert (await chat(client)).status == 200  # 38: over now
    resp = await chat(client)
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "BUDGET_EXCEEDED"
    assert resp.headers["x-should-retry"] == "false"
    assert "Retry-After" not in resp.headers


# --- rate-limit headers on every /v1/* response of a keyed request ------------------------

LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{dim}"
    for dim in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


def limit_headers(resp: Any) -> dict[str, str]:
    missing = [h for h in LIMIT_HEADERS if h not in resp.headers]
    assert not missing, (resp.method, resp.url.path, resp.status, missing)
    return {h: resp.headers[h] for h in LIMIT_HEADERS}


async def test_rate_limit_headers_on_every_endpoint(gateway_for) -> None:
    """Embeddings, completions, responses count against the limits and say so; the models
    list, a stored-response lookup and a 400 report the limits without being counted."""
    client = await gateway_for(**keyed(rpm=100, tpm=100_000))
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/v1/embeddings", {"input": "hi"}, 200),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 5}, 200),
        ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 5}, 200),
        ("GET", "/v1/models", None, 200),
        ("GET", "/v1/responses/resp_0123456789abcdef", None, 404),
        ("DELETE", "/v1/responses/resp_0123456789abcdef", None, 404),
        ("POST", "/v1/embeddings", {"input": 5}, 400),
        ("POST", "/v1/chat/completions", {"messages": "not a list"}, 400),
    ]
    remaining = []
    for method, path, body, status in cases:
        resp = await client.request(method, path, json=body, headers=auth())
        assert resp.status == status, (method, path, await resp.text())
        got = limit_headers(resp)
        assert got["x-ratelimit-limit-requests"] == "100"
        assert got["x-ratelimit-limit-tokens"] == "100000"
        assert got["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(got["x-ratelimit-remaining-requests"]))
    assert remaining == [99, 98, 97, 97, 97, 97, 97, 97]
    # ...and a request without a valid key is told nothing about the key's limits
    resp = await client.get("/v1/models")
    assert resp.status == 401
    assert not any(h.lower().startswith("x-ratelimit") for h in resp.headers)


async def test_rate_limit_headers_on_refusals(gateway_for) -> None:
    """403 (model not allowed), 429 budget and 429 rate limit all carry the headers."""
    client = await gateway_for(
        **keyed(
            rpm=3,
            tpm=100_000,
            models=["gpt-oss-20b"],
            budget={"tokens": 30, "period": "day"},
        )
    )
    resp = await chat(client, model="not-allowed")
    assert resp.status == 403
    assert limit_headers(resp)["x-ratelimit-remaining-requests"] == "3"
    assert (await chat(client)).status == 200  # 19 tokens
    assert (await chat(client)).status == 200  # 38: over the budget now
    resp = await chat(client)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "BUDGET_EXCEEDED"
    got = limit_headers(resp)
    assert got["x-ratelimit-remaining-requests"] == "1"
    # 38 tokens used (settled to the real usage), refilling at 100 000 a minute since
    assert 100_000 - 38 <= int(got["x-ratelimit-remaining-tokens"]) < 100_000 - 19


# --- admin API and usage ---------------------------------------------------------------------


async def test_admin_keys_lifecycle_and_usage(gateway_for) -> None:
    client = await gateway_for(**keyed())
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert (await client.post("/admin/keys", json={"name": "x"})).status == 401
    resp = await client.post("/admin/keys", json={"name": "web", "rpm": 10}, headers=admin)
    assert resp.status == 201
    created = await resp.json()
    key, kid = created["key"], created["id"]
    assert created["rpm"] == 10
    assert "key_sha256" not in created
    resp = await chat(client, key=key)
    assert resp.status == 200
    assert resp.headers["x-ratelimit-limit-requests"] == "10"
    listed = await (await client.get("/admin/keys", headers=admin)).json()
    names = {k["name"]: k for k in listed["data"]}
    assert set(names) == {"team", "web"}
    assert key not in str(listed)
    resp = await client.patch(f"/admin/keys/{kid}", json={"disabled": True}, headers=admin)
    assert resp.status == 200
    assert (await chat(client, key=key)).status == 401
    await client.patch(f"/admin/keys/{kid}", json={"disabled": False}, headers=admin)
    assert (await chat(client, key=key)).status == 200
    usage = await (await client.get(f"/admin/usage?key={kid}", headers=admin)).json()
    assert [(r["key"], r["requests"], r["total_tokens"]) for r in usage["data"]] == [("web", 2, 38)]
    csv = await (await client.get("/admin/usage?format=csv", headers=admin)).text()
    assert csv.splitlines()[0].startswith("day,key,key_id,model,prompt_tokens")
    assert (await client.delete(f"/admin/keys/{kid}", headers=admin)).status == 204
    assert (await chat(client, key=key)).status == 401
    assert (await client.get(f"/admin/keys/{kid}", headers=admin)).status == 404
    team = names["team"]["id"]
    assert (await client.delete(f"/admin/keys/{team}", headers=admin)).status == 409


async def test_admin_rejects_bad_bodies(gateway_for) -> None:
    client = await gateway_for(**keyed())
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for body in ({"name": "a b"}, {"name": "x", "rpm": -1}, {"name": "x", "evil": 1}, [1]):
        resp = await client.post("/admin/keys", json=body, headers=admin)
        assert resp.status == 400, body
        assert (await resp.json())["error"]["message"]
    resp = await client.post(
        "/admin/keys", json={"name": "old", "expires_at": "2000-01-01T00:00:00Z"}, headers=admin
    )
    key = (await resp.json())["key"]
    resp = await chat(client, key=key)
    assert resp.status == 401
    assert "expired" in (await resp.json())["error"]["message"]


# --- CORS ------------------------------------------------------------------------------------


async def test_cors_preflight_and_keyed_request(gateway_for) -> None:
    origin = "https://app.example.com"
    config = keyed(rpm=5)
    config["server"]["cors"] = {"allow_origins": [origin]}
    client = await gateway_for(**config)
    resp = await client.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-evil",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    resp = await client.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(), "Origin": origin}
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    exposed = resp.headers["Access-Control-Expose-Headers"]
    assert "x-ratelimit-remaining-requests" in exposed
    assert "x-request-id" in exposed
    # an origin not on the list gets no CORS headers
    resp = await client.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(), "Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in resp.headers


# --- Redis -----------------------------------------------------------------------------------


def redis_state(server: RedisServer, on_error: str = "allow") -> dict[str, Any]:
    return {
        "state": {
            "backend": "redis",
            "redis_url": server.url,
            "on_error": on_error,
            "timeout_secs": 0.3,
        }
    }


async def test_redis_limits_two_apps_share_one_limit(
    redis_server: RedisServer, make_settings, make_gateway, fake_upstream
) -> None:
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url},
            **keyed(rpm=4),
            **redis_state(redis_server),
        }
    )
    a, b = await make_gateway(settings), await make_gateway(settings)
    results = await asyncio.gather(*(chat(c) for c in (a, b) * 4))
    assert sorted(r.status for r in results) == [200] * 4 + [429] * 4
    limited = next(r for r in results if r.status == 429)
    assert limited.headers["x-should-retry"] == "true"


@pytest.mark.parametrize("on_error", ["allow", "deny"])
async def test_redis_down_then_back(
    redis_server: RedisServer, make_settings, make_gateway, fake_upstream, on_error: str
) -> None:
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url},
            **keyed(rpm=2),
            **redis_state(redis_server, on_error),
        }
    )
    client = await make_gateway(settings)
    assert (await chat(client)).status == 200
    redis_server.stop()
    resp = await chat(client)
    if on_error == "allow":
        assert resp.status == 200
        # unchecked: the headers say what this process last saw (one request admitted)
        assert resp.headers["x-ratelimit-remaining-requests"] == "1"
    else:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
    from inference_server.state import REDIS_HEALTH

    assert client.app[REDIS_HEALTH].failures >= 1
    redis_server.start()  # empty again: the limit starts over, exactly
    statuses = [(await chat(client)).status for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_redis_budget_and_usage(
    redis_server: RedisServer, make_settings, make_gateway, fake_upstream
) -> None:
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url},
            **keyed(budget={"tokens": 30, "period": "month"}),
            **redis_state(redis_server),
            "usage": {"flush_secs": 0.05},
        }
    )
    client = await make_gateway(settings)
    t = client.app[TENANCY]
    assert (await chat(client)).status == 200
    await t.ledger.flush()
    assert (await chat(client)).status == 200
    await t.ledger.flush()
    resp = await chat(client)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "BUDGET_EXCEEDED"
    admin = {"Authorization": f"Bearer {ADMIN}"}
    usage = await (await client.get("/admin/usage?key=team", headers=admin)).json()
    assert usage["scope"] == "all processes"
    assert sum(r["total_tokens"] for r in usage["data"]) == 38


async def settled(client: Any) -> None:
    """Wait (bounded) until the queued Redis settlements were sent."""
    limiter = client.app[TENANCY].redis_limiter
    for _ in range(200):
        if not limiter.pending:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("settlements still queued after 2 s")


@pytest.mark.parametrize("stream", [False, True])
async def test_redis_tpm_settles_to_real_usage_and_frees_slots(
    redis_server: RedisServer, make_settings, make_gateway, fake_upstream, stream: bool
) -> None:
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url},
            **keyed(tpm=1000, max_parallel=1),
            **redis_state(redis_server),
        }
    )
    client = await make_gateway(settings)
    body: dict[str, Any] = {"max_tokens": 500}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    resp = await chat(client, **body)
    assert resp.status == 200
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - 508
    await resp.read()
    await settled(client)
    used = 8 if stream else 19  # the fake's usage: streamed 5 + 3, else 12 + 7
    resp = await chat(client, max_tokens=100)
    assert resp.status == 200  # the concurrency slot of the first request was freed
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 1000 - used - 108


async def test_access_line_names_the_key_never_the_key(gateway_for) -> None:
    from loguru import logger

    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record["extra"]), level="INFO")
    try:
        client = await gateway_for(**keyed(), logging={"level": "info"})
        assert (await chat(client)).status == 200
    finally:
        logger.remove(sink)
    access = [r for r in records if r.get("event") == "access"]
    assert access
    assert access[-1]["key"] == "team"
    assert KEY not in str(records)


async def test_server_span_names_the_key(gateway_for) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from inference_server.keys import TELEMETRY

    client = await gateway_for(**keyed(), telemetry={"traces": {"exporter": "console"}})
    memory = InMemorySpanExporter()
    provider = client.app[TELEMETRY].provider
    assert provider is not None
    provider.add_span_processor(SimpleSpanProcessor(memory))
    assert (await chat(client)).status == 200
    server = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert server[0].attributes is not None
    assert server[0].attributes["inference.key"] == "team"
    assert KEY not in str([dict(s.attributes or {}) for s in memory.get_finished_spans()])


async def test_redis_rate_limit_headers_without_an_admission(
    redis_server: RedisServer, make_settings, make_gateway, fake_upstream
) -> None:
    """With Redis, responses that admit nothing report the limits from what this process last
    saw (no Redis call for them), and so does an admission made while Redis is away."""
    settings = make_settings(
        {
            "inference": {"base_url": fake_upstream.base_url},
            **keyed(rpm=10, tpm=10_000, models=["gpt-oss-20b"]),
            **redis_state(redis_server),
        }
    )
    client = await make_gateway(settings)
    assert (await chat(client)).status == 200
    assert (await chat(client)).status == 200
    for resp in (
        await client.get("/v1/models", headers=auth()),
        await chat(client, model="not-allowed"),
        await client.post("/v1/embeddings", json={"input": 5}, headers=auth()),
    ):
        assert resp.status in (200, 400, 403)
        got = limit_headers(resp)
        assert got["x-ratelimit-limit-requests"] == "10"
        assert got["x-ratelimit-remaining-requests"] == "8"
    redis_server.stop()
    resp = await chat(client)  # on_error allow: admitted unchecked, still told its limits
    assert resp.status == 200
    assert limit_headers(resp)["x-ratelimit-remaining-requests"] == "8"
