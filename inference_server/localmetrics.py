"""Counters, gauges and histograms held in plain numbers, exported as a custom collector.

Why: a single-worker gateway records ~10 values per request (count, duration, overhead,
in-flight, tokens, upstream time).  prometheus-client's own metric objects take a lock and run
validity checks on every ``inc``/``observe`` (a histogram observe is two locked increments):
about 10 % of the gateway's CPU per request, measured with callgrind.  The gateway's request
path runs on one event-loop thread, so these families keep plain floats, updated without a
lock, and hand them to prometheus-client through its documented custom-collector interface
(``collect()`` yielding ``CounterMetricFamily``/``GaugeMetricFamily``/``HistogramMetricFamily``,
registered with ``CollectorRegistry.register``).  Nothing here touches the library's private
side.

Semantics held equal to the library's (a ``differential`` test renders the same operations
through both and compares the exposition byte for byte): the same family and sample names,
values as floats, children exported in creation order, a histogram's bucket chosen as the
first upper bound ≥ the value (``+Inf`` last), cumulative buckets, ``_count`` and ``_sum``, no
``_created`` series (the gateway disables them), negative counter increments refused.

Where they are not used: with ``--workers N`` values must reach prometheus-client's
multiprocess files, so :class:`~inference_server.metrics.Metrics` uses the library's classes
there.  Only the event-loop thread may write (the gateway's recording calls all run there); a
scrape reads between two loop steps, so it sees whole updates.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = ["LocalCounter", "LocalGauge", "LocalHistogram"]


def go_float(value: float) -> str:
    """A bucket bound as the text format writes it (Go's formatting: ``+Inf``, ``1e-05``)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(float(value))
    whole = text.partition(".")[0].lstrip("-")
    if "e" in text or len(whole) <= 6:
        # Python and Go agree here: shortest digits, an exponent below 1e-4 ('5e-05').
        return text
    # Go writes a value of 1e6 or more with an exponent where Python writes digits:
    # 1048576.0 -> '1.048576e+06'.
    digits = text.replace(".", "").lstrip("-").rstrip("0")
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{'-' if value < 0 else ''}{mantissa}e+{len(whole) - 1:02d}"


class _Family:
    """A metric family: a name, its help, its label names and one value holder per label set."""

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: Any = None,
        **_ignored: Any,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self.children[()] = self.new_child()
        if registry is not None:
            registry.register(self)

    def new_child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        """The child for these label values (created on first use, like the library's)."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values")
        key = tuple(str(v) for v in values)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.new_child()
        return child

    def remove(self, *values: str) -> None:
        self.children.pop(tuple(str(v) for v in values), None)

    def family(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self.family()]

    def collect(self) -> Iterator[Metric]:
        yield self.family()

    # Unlabelled families act as their own child, like the library's.
    def inc(self, amount: float = 1.0) -> None:
        self.children[()].inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.children[()].dec(amount)

    def set(self, value: float) -> None:
        self.children[()].set(value)

    def observe(self, amount: float) -> None:
        self.children[()].observe(amount)


class _CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.sum += amount
        i = bisect_left(self.bounds, amount)
        if i < len(self.counts) and amount == amount:  # NaN falls in no bucket (as the library)
            self.counts[i] += 1.0


class _ValueFamily(_Family):
    """A family whose children hold one number each (counters, gauges)."""

    exported: type[CounterMetricFamily] | type[GaugeMetricFamily] = GaugeMetricFamily

    def family(self) -> Metric:
        fam = self.exported(self.name, self.documentation, labels=self.labelnames)
        for key, child in self.children.items():
            fam.add_metric(key, child.value)
        return fam


class LocalCounter(_ValueFamily):
    """A counter family (exported as ``<name>_total``)."""

    exported = CounterMetricFamily

    def new_child(self) -> _CounterValue:
        return _CounterValue()


class LocalGauge(_ValueFamily):
    """A gauge family."""

    exported = GaugeMetricFamily

    def new_child(self) -> _GaugeValue:
        return _GaugeValue()


class LocalHistogram(_Family):
    """A histogram family with fixed buckets (``+Inf`` added as the library does)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: Any = None,
        buckets: Sequence[float] = (),
        **_ignored: Any,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self.les = tuple(go_float(b) for b in bounds)
        super().__init__(name, documentation, labelnames, registry)

    def new_child(self) -> _HistogramValue:
        return _HistogramValue(self.bounds)

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self.children.items():
            total = 0.0
            cumulative = []
            for le, count in zip(self.les, child.counts, strict=True):
                total += count
                cumulative.append((le, total))
            fam.add_metric(key, cumulative, child.sum)
        return fam
