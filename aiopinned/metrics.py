"""Prometheus metrics for a pool (``pip install 'aiopinned[prometheus]'``).

>>> from prometheus_client import REGISTRY              # doctest: +SKIP
>>> REGISTRY.register(PoolCollector(pool, name="staging"))

:class:`PoolCollector` is a custom collector: each scrape reads ``pool.stats()`` (safe from any
thread, such as ``prometheus_client``'s HTTP server thread) and reports it under the
``aiopinned_`` prefix in base units (bytes, seconds), labelled with the pool's ``device``
(``cuda:0``, ``host``) and ``pool`` name, plus any ``labels`` given.

Several worker processes (uvicorn or gunicorn workers, each with its own pool): a custom collector
is not shared between processes, so in ``prometheus_client``'s multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` set) use :class:`MultiProcessPublisher`, which copies the same
figures into the multiprocess files every ``interval_s`` from each worker's loop; the scrape
endpoint serves them through ``prometheus_client.multiprocess.MultiProcessCollector``, gauges
summed over the live workers and counters and histograms over all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

try:
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as _exc:  # pragma: no cover - the optional extra is missing
    raise ImportError(
        "aiopinned.metrics needs prometheus_client: pip install 'aiopinned[prometheus]'"
    ) from _exc

import anyio

from ._pool import PinnedPool
from ._stats import TIME_BUCKETS_S, PoolStats

__all__ = ["MultiProcessPublisher", "PoolCollector"]

Read = Callable[[PoolStats], float]
ReadTimes = Callable[[PoolStats], tuple[tuple[int, ...], float]]

#: gauge name, help, and how to read it from a PoolStats
GAUGES: tuple[tuple[str, str, Read], ...] = (
    ("aiopinned_reserved_bytes", "Pinned bytes, pinning in flight included.",
     lambda s: s.reserved_bytes),
    ("aiopinned_active_bytes", "Bytes of blocks handed out and not yet given back.",
     lambda s: s.active_bytes),
    ("aiopinned_cached_bytes", "Pinned bytes idle in the cache.", lambda s: s.cached_bytes),
    ("aiopinned_pending_events", "Events recorded on streams and not yet seen to complete.",
     lambda s: s.pending_events),
    ("aiopinned_waiters", "Callers waiting for a block.", lambda s: s.waiters),
    ("aiopinned_max_bytes", "The pool's cap on pinned bytes (0: none).",
     lambda s: s.max_bytes or 0),
)  # fmt: skip
#: counter name (without ``_total``), help, and how to read it
COUNTERS: tuple[tuple[str, str, Read], ...] = (
    ("aiopinned_cache_hits", "Allocations served from the cache.", lambda s: s.cache_hits),
    ("aiopinned_cache_misses", "Allocations that pinned a new block.", lambda s: s.cache_misses),
    ("aiopinned_host_allocs", "Blocks pinned.", lambda s: s.num_host_alloc),
    ("aiopinned_host_frees", "Blocks unpinned.", lambda s: s.num_host_free),
    ("aiopinned_waits", "Allocations that queued for a block.", lambda s: s.num_waits),
)  # fmt: skip
#: histogram name, help, and its (buckets, total microseconds) in a PoolStats
HISTOGRAMS: tuple[tuple[str, str, ReadTimes], ...] = (
    ("aiopinned_wait_seconds", "Time callers waited for a block.",
     lambda s: (s.wait_time_buckets, s.wait_time_us_total)),
    ("aiopinned_pin_seconds", "Time pinning a block took.",
     lambda s: (s.host_alloc_time_buckets, s.host_alloc_time_us_total)),
)  # fmt: skip


def _labels(pool: PinnedPool, name: str, labels: Mapping[str, str] | None) -> dict[str, str]:
    """The labels and their values, read afresh at each scrape: ``device`` is the backend
    (``cuda:1``, ``host``), known once the pool is open."""
    extra = dict(labels or {})
    clash = {"device", "pool"} & set(extra)
    if clash:
        raise ValueError(f"labels may not redefine {sorted(clash)}: the collector sets them")
    device = pool.backend if pool.device is None else f"{pool.backend}:{pool.device}"
    return {"device": device, "pool": name, **extra}


def _cumulative(buckets: tuple[int, ...]) -> list[tuple[str, int]]:
    out, running = [], 0
    for bound, n in zip((*map(str, TIME_BUCKETS_S), "+Inf"), buckets, strict=True):
        running += n
        out.append((bound, running))
    return out


class PoolCollector:
    """A Prometheus collector of one pool's figures; register it with any registry."""

    def __init__(
        self, pool: PinnedPool, *, name: str = "default", labels: Mapping[str, str] | None = None
    ) -> None:
        if not isinstance(pool, PinnedPool):
            raise TypeError(f"PoolCollector takes a PinnedPool, not {type(pool).__name__}")
        self._pool, self._name, self._extra = pool, name, labels
        _labels(pool, name, labels)  # (checked now)

    def describe(self) -> list[Metric]:
        return []  # (no scrape at registration: the pool may not be open yet)

    def collect(self) -> Iterator[Metric]:
        stats, labels = self._pool.stats(), _labels(self._pool, self._name, self._extra)
        keys, values = list(labels), list(labels.values())
        for name, doc, read in GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=keys)
            gauge.add_metric(values, read(stats))
            yield gauge
        for name, doc, read in COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=keys)
            counter.add_metric(values, read(stats))
            yield counter
        for name, doc, times in HISTOGRAMS:
            buckets, total_us = times(stats)
            histogram = HistogramMetricFamily(name, doc, labels=keys)
            histogram.add_metric(values, _cumulative(buckets), total_us / 1e6)
            yield histogram


class MultiProcessPublisher:
    """Copies a pool's figures into ``prometheus_client``'s multiprocess files (one worker
    process's share), every ``interval_s``: ``async with MultiProcessPublisher(pool):`` on the
    pool's loop, or call :meth:`publish` yourself."""

    def __init__(
        self,
        pool: PinnedPool,
        *,
        name: str = "default",
        labels: Mapping[str, str] | None = None,
        interval_s: float = 1.0,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s!r}")
        self._pool, self._interval_s, self._name, self._extra = pool, interval_s, name, labels
        keys = list(_labels(pool, name, labels))
        self._gauges = [
            (Gauge(n, doc, keys, registry=None, multiprocess_mode="livesum"), read)
            for n, doc, read in GAUGES
        ]
        self._counters = [(Counter(n, doc, keys, registry=None), read) for n, doc, read in COUNTERS]
        self._histograms = [
            (Histogram(n, doc, keys, registry=None, buckets=TIME_BUCKETS_S), times)
            for n, doc, times in HISTOGRAMS
        ]
        self._last: PoolStats | None = None
        self._task_group: Any = None

    def publish(self) -> None:
        """Copy the figures now: gauges as they are, counters and histograms by what changed
        since the last call (a histogram's new observations land at their buckets' bounds)."""
        stats, last = self._pool.stats(), self._last
        values = _labels(self._pool, self._name, self._extra).values()
        for gauge, read in self._gauges:
            gauge.labels(*values).set(read(stats))
        for counter, read in self._counters:
            delta = read(stats) - (read(last) if last else 0)
            if delta > 0:
                counter.labels(*values).inc(delta)
        for histogram, times in self._histograms:
            buckets, total_us = times(stats)
            before, before_us = times(last) if last else ((0,) * len(buckets), 0.0)
            new = [a - b for a, b in zip(buckets, before, strict=True)]
            if any(new):
                _observe(histogram.labels(*values), new, (total_us - before_us) / 1e6)
        self._last = stats

    async def __aenter__(self) -> MultiProcessPublisher:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._run)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        self.publish()  # the last figures

    async def _run(self) -> None:
        while True:
            self.publish()
            await anyio.sleep(self._interval_s)


def _observe(child: Any, new: list[int], seconds: float) -> None:
    """Add ``new[i]`` observations to bucket ``i``, and ``seconds`` to the sum, exactly."""
    placed = 0.0
    for bound, n in zip((*TIME_BUCKETS_S, TIME_BUCKETS_S[-1] * 10), new, strict=True):
        for _ in range(n):
            child.observe(bound)
            placed += bound
    child._sum.inc(seconds - placed)  # (the bucket bounds stood in for the real durations)
