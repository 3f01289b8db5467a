"""Prometheus metrics for a pool (``pip install 'aiopinned[prometheus]'``).

>>> from prometheus_client import REGISTRY              # doctest: +SKIP
>>> REGISTRY.register(PoolCollector(pool, name="staging"))
>>> REGISTRY.register(PoolCollector({"main": pool, "lane": lane}))  # several: one collector

:class:`PoolCollector` is a custom collector: each scrape reads ``pool.stats()`` (safe from any
thread, such as ``prometheus_client``'s HTTP server thread) and reports it under the
``aiopinned_`` prefix in base units (bytes, seconds), labelled with the pool's ``device``
(``cuda:0``, ``host``) and ``pool`` name, plus any ``labels`` given.  Several pools go in one
collector, so that each metric family is written once (the exposition formats allow one
``HELP``/``TYPE`` per name); its ``describe`` names the families, so a registry refuses a second
collector of the same names at ``register`` instead of writing them twice at every scrape.

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

import re

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
    ("aiopinned_reserve_target_bytes", "Bytes that reserves still running were asked for.",
     lambda s: s.reserve_target_bytes),
    ("aiopinned_reserve_done_bytes", "Bytes that reserves still running have pinned so far.",
     lambda s: s.reserve_done_bytes),
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


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _checked(name: object, labels: object) -> dict[str, str]:
    """A pool's name and extra labels, checked now (a bad one would fail every scrape later)."""
    if not isinstance(name, str):
        raise TypeError(f"the pool's name must be a str, not {type(name).__name__}")
    if labels is not None and not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a mapping of str to str, not {type(labels).__name__}")
    extra = dict(labels or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
            raise ValueError(f"{key!r} is not a Prometheus label name")
        if not isinstance(value, str):
            raise TypeError(f"label {key!r} must have a str value, not {type(value).__name__}")
    clash = {"device", "pool"} & set(extra)
    if clash:
        raise ValueError(f"labels may not redefine {sorted(clash)}: the collector sets them")
    return extra


def _labels(pool: PinnedPool, name: str, extra: Mapping[str, str]) -> dict[str, str]:
    """The labels and their values, read afresh at each scrape: ``device`` is the backend
    (``cuda:1``, ``host``), known once the pool is open."""
    device = pool.backend if pool.device is None else f"{pool.backend}:{pool.device}"
    return {"device": device, "pool": name, **extra}


def _cumulative(buckets: tuple[int, ...]) -> list[tuple[str, int]]:
    out, running = [], 0
    for bound, n in zip((*map(str, TIME_BUCKETS_S), "+Inf"), buckets, strict=True):
        running += n
        out.append((bound, running))
    return out


class PoolCollector:
    """A Prometheus collector of one pool's figures, or of several pools' (``{name: pool}``:
    each family once, a sample per pool); register it with any registry."""

    def __init__(
        self,
        pools: PinnedPool | Mapping[str, PinnedPool],
        *,
        name: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> None:
        named = {name: pools} if isinstance(pools, PinnedPool) else pools
        if not isinstance(named, Mapping) or not named:
            raise TypeError(
                "PoolCollector takes a PinnedPool or a non-empty mapping of names to pools, not "
                f"{type(pools).__name__}"
            )
        for key, pool in named.items():
            _checked(key, None)
            if not isinstance(pool, PinnedPool):
                raise TypeError(f"PoolCollector takes PinnedPools, not {type(pool).__name__}")
        self._pools, self._extra = dict(named), _checked(name, labels)

    def describe(self) -> list[Metric]:
        """The families, without samples (the pools may not be open yet): a registry checks
        their names against the collectors it has."""
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        return self._families(
            [(_labels(pool, name, self._extra), pool.stats()) for name, pool in self._pools.items()]
        )

    def _families(self, samples: list[tuple[dict[str, str], PoolStats]]) -> Iterator[Metric]:
        keys = ["device", "pool", *self._extra]
        for name, doc, read in GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=keys)
            for labels, stats in samples:
                gauge.add_metric(list(labels.values()), read(stats))
            yield gauge
        for name, doc, read in COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=keys)
            for labels, stats in samples:
                counter.add_metric(list(labels.values()), read(stats))
            yield counter
        for name, doc, times in HISTOGRAMS:
            histogram = HistogramMetricFamily(name, doc, labels=keys)
            for labels, stats in samples:
                buckets, total_us = times(stats)
                histogram.add_metric(list(labels.values()), _cumulative(buckets), total_us / 1e6)
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
        extra = _checked(name, labels)
        self._pool, self._interval_s, self._name, self._extra = pool, interval_s, name, extra
        keys = list(_labels(pool, name, extra))
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
