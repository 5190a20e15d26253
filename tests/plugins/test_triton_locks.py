"""The Triton provider's per-model metadata locks stay bounded (issue 11, item 4).

Without a model table the provider takes any model name a client sends; a lock per name used to
stay in a dict forever, so a client spraying names grew the process without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import aiohttp
from aioresponses import aioresponses

from tests.plugins.test_triton_unit import BASE, LLM_METADATA, TIMEOUTS, make_provider

METADATA = re.compile(rf"^{re.escape(BASE)}/v2/models/[^/]+$")
CONFIG = re.compile(rf"^{re.escape(BASE)}/v2/models/[^/]+/config$")


async def test_metadata_locks_leave_no_entry_per_model_name(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    provider = make_provider(session, metadata_cache_secs=0)
    http_mock.get(CONFIG, payload={"model_transaction_policy": {}}, repeat=True)
    http_mock.get(METADATA, payload=LLM_METADATA, repeat=True)
    for i in range(300):
        name = f"m{i}-" + "x" * 1000
        await provider.metadata(name, provider.options_for(name), TIMEOUTS)
    assert provider._metadata_locks == {}
    # A failing fetch releases its entry too.
    http_mock.clear()
    http_mock.get(METADATA, status=404, payload={"error": "unknown model"}, repeat=True)
    for i in range(5):
        with contextlib.suppress(Exception):  # only the table matters here
            await provider.metadata(f"gone{i}", provider.options_for("gone"), TIMEOUTS)
    assert provider._metadata_locks == {}


async def test_concurrent_fetches_of_one_model_still_share_one_lock(
    http_mock: aioresponses, session: aiohttp.ClientSession
) -> None:
    """Waiters keep the entry alive, so one model's metadata is fetched once at a time and
    the cache filled by the first is what the others read."""
    provider = make_provider(session)  # metadata_cache_secs 60
    http_mock.get(CONFIG, payload={"model_transaction_policy": {}}, repeat=True)
    http_mock.get(METADATA, payload=LLM_METADATA, repeat=True)
    options = provider.options_for("llm")
    metas = await asyncio.gather(*(provider.metadata("llm", options, TIMEOUTS) for _ in range(5)))
    assert all(m is metas[0] for m in metas)
    gets = [key for key in http_mock.requests if key[0] == "GET" and METADATA.match(str(key[1]))]
    assert len(http_mock.requests[gets[0]]) == 1
    assert provider._metadata_locks == {}
