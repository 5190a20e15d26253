"""The usage ledger: prompt and completion tokens per key, model and UTC day, and budget spend.

``add`` is a few dict operations on the request path; a background task flushes what
accumulated every ``usage.flush_secs`` (memory: into this process's tables; Redis: one pipelined
batch of ``HINCRBY``/``INCRBY``).  So a budget is checked against spend that is at most one
flush interval old: a key may overshoot its budget by what it spends within one interval
(plus the requests already admitted when it ran out).

Redis layout: ``isv:usage:<YYYY-MM-DD>`` is a hash with fields ``<key id>|<model>|<what>``
(``prompt``, ``completion``, ``requests``, ``estimated``), kept 400 days; ``isv:spent:<key
id>:<period>`` is the key's token spend in a budget period (``2026-11-26`` or ``2026-11``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from loguru import logger
from redis.asyncio import Redis

from inference_server.limits import PREFIX

FIELDS = ("prompt", "completion", "requests", "estimated")
#: Distinct (key, model, day) rows pending between flushes; beyond it models fold into "other".
MAX_PENDING = 10_000
#: Model names in the ledger are cut to this (they are names the upstream answered for).
MAX_MODEL_CHARS = 100
USAGE_TTL_SECS = 400 * 86400
ANONYMOUS = "-"

Row = tuple[str, str, str]  # key id, model, day


def today(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d")


class Ledger:
    """Per-process accumulation, flushed off the request path."""

    def __init__(self, redis: Redis | None) -> None:
        self.redis = redis
        self.pending: dict[Row, list[int]] = {}
        self.pending_spend: dict[str, int] = {}  # spent key → tokens
        #: Memory backend: everything flushed so far (the ledger itself).
        self.rows: dict[Row, list[int]] = {}
        self.spent: dict[str, int] = {}
        #: (UTC day number, "YYYY-MM-DD"): strftime once a day, not per request.
        self._day: tuple[int, str] = (-1, "")
        #: The Unix times at which ``_day`` starts and ends: the request path compares floats.
        self._day_starts = self._day_ends = 0.0
        #: Spend keys of today's periods per (key id, period): formatted once a day.
        self._spent_keys: dict[tuple[str, str], str] = {}

    def today(self) -> str:
        now = time.time()
        if not self._day_starts <= now < self._day_ends:
            self._roll(now)
        return self._day[1]

    def _roll(self, now: float) -> None:
        """A new UTC day (or the first call): today's string, and the spend keys start over."""
        number = int(now // 86400)
        if number != self._day[0]:
            self._day = (number, today())
            self._spent_keys = {}
        self._day_starts, self._day_ends = number * 86400.0, (number + 1) * 86400.0

    def spent_key(self, key_id: str, period: str) -> str:
        now = time.time()
        if not self._day_starts <= now < self._day_ends:
            self._roll(now)
        skey = self._spent_keys.get((key_id, period))
        if skey is None:
            day = self._day[1]
            skey = f"{PREFIX}spent:{key_id}:{day if period == 'day' else day[:7]}"
            if len(self._spent_keys) < MAX_PENDING:  # key ids: configured or admin-made
                self._spent_keys[(key_id, period)] = skey
        return skey

    def add(
        self,
        key_id: str,
        model: str | None,
        prompt: int,
        completion: int,
        estimated: bool,
        budget_period: str | None,
    ) -> None:
        """Add one request's token counts (already checked: ints ≥ 0).  Every keyed request
        settles through here, so the day and the spend key are looked up inline."""
        now = time.time()
        if not self._day_starts <= now < self._day_ends:
            self._roll(now)
        if not model:
            model = ANONYMOUS
        elif len(model) > MAX_MODEL_CHARS:
            model = model[:MAX_MODEL_CHARS]
        row = (key_id, model, self._day[1])
        counts = self.pending.get(row)
        if counts is None:
            if len(self.pending) >= MAX_PENDING:
                row = (key_id, "other", row[2])
            counts = self.pending.setdefault(row, [0, 0, 0, 0])
        counts[0] += prompt
        counts[1] += completion
        counts[2] += 1
        if estimated:
            counts[3] += 1
        total = prompt + completion
        if budget_period is not None and total:
            skey = self._spent_keys.get((key_id, budget_period))
            if skey is None:
                skey = self.spent_key(key_id, budget_period)
            pending = self.pending_spend
            pending[skey] = pending.get(skey, 0) + total

    def spent_now(self, key_id: str, period: str) -> int:
        """Memory backend: the key's spend this period (flushed and pending)."""
        now = time.time()
        if not self._day_starts <= now < self._day_ends:
            self._roll(now)
        skey = self._spent_keys.get((key_id, period))
        if skey is None:
            skey = self.spent_key(key_id, period)
        return self.spent.get(skey, 0) + self.pending_spend.get(skey, 0)

    async def flush(self) -> None:
        """Move what is pending into the ledger (Redis: one pipelined round trip)."""
        if not self.pending and not self.pending_spend:
            return
        pending, spend = self.pending, self.pending_spend
        self.pending, self.pending_spend = {}, {}
        if self.redis is None:
            for row, counts in pending.items():
                into = self.rows.setdefault(row, [0, 0, 0, 0])
                for i, n in enumerate(counts):
                    into[i] += n
            for skey, n in spend.items():
                self.spent[skey] = self.spent.get(skey, 0) + n
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (key_id, model, day), counts in pending.items():
                    hkey = f"{PREFIX}usage:{day}"
                    for what, n in zip(FIELDS, counts, strict=True):
                        if n:
                            pipe.hincrby(hkey, f"{key_id}|{model}|{what}", n)
                    pipe.expire(hkey, USAGE_TTL_SECS)
                for skey, n in spend.items():
                    pipe.incrby(skey, n)
                    pipe.expire(skey, 32 * 86400)
                await pipe.execute()
        except Exception:
            # Put it back: the next flush tries again (counts are additive).
            for row, counts in pending.items():
                into = self.pending.setdefault(row, [0, 0, 0, 0])
                for i, n in enumerate(counts):
                    into[i] += n
            for skey, n in spend.items():
                self.pending_spend[skey] = self.pending_spend.get(skey, 0) + n
            raise

    async def query(
        self, key_id: str | None, model: str | None, start: dt.date, end: dt.date
    ) -> list[dict[str, Any]]:
        """Rows per key, model and day within [start, end] (at most 400 days)."""
        out: list[dict[str, Any]] = []
        for day in _days(start, end):
            if self.redis is None:
                items = {(k, m): counts for (k, m, d), counts in self.rows.items() if d == day}
            else:
                raw = await self.redis.hgetall(f"{PREFIX}usage:{day}")
                items = {}
                for field, value in raw.items():
                    k, _, rest = _text(field).partition("|")
                    m, _, what = rest.rpartition("|")
                    if what in FIELDS:
                        items.setdefault((k, m), [0, 0, 0, 0])[FIELDS.index(what)] = int(value)
            for (k, m), counts in sorted(items.items()):
                if (key_id is None or k == key_id) and (model is None or m == model):
                    out.append(
                        {
                            "day": day,
                            "key_id": k,
                            "model": m,
                            "prompt_tokens": counts[0],
                            "completion_tokens": counts[1],
                            "total_tokens": counts[0] + counts[1],
                            "requests": counts[2],
                            "estimated_requests": counts[3],
                        }
                    )
        return out

    async def run(
        self,
        every_secs: float,
        on_error: Any,
        also: Callable[[], None] | None = None,
        pause: Callable[[float], Awaitable[bool]] | None = None,
    ) -> None:
        """Flush every ``every_secs`` until ``pause`` says stop; ``also`` runs with each."""
        while not await (pause or _sleep)(every_secs):
            if also is not None:
                also()
            try:
                await self.flush()
            except Exception as exc:  # noqa: BLE001 (Redis away: retried next interval)
                on_error("usage flush", exc)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self.pending:
            logger.warning("usage: {} ledger rows could not be written", len(self.pending))


async def _sleep(secs: float) -> bool:
    await asyncio.sleep(secs)
    return False


def _days(start: dt.date, end: dt.date) -> Iterator[str]:
    day, n = start, 0
    while day <= end and n < 400:
        yield day.isoformat()
        day += dt.timedelta(days=1)
        n += 1


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
