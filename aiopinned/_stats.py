"""PoolStats, a frozen snapshot of a pool's counters, and Counters, the running counts."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ._loopport import LoopGone, LoopPort

#: upper bounds (seconds) of the histogram buckets of waits and pins; the last bucket is +Inf
TIME_BUCKETS_S = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
_BOUNDS_US = [b * 1e6 for b in TIME_BUCKETS_S]


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What a :class:`~aiopinned.PinnedPool` holds and has done, at one instant.

    Byte counts are block sizes (what is pinned), not requested sizes.  The names follow
    ``torch.cuda.host_memory_stats()`` where PyTorch has one; times are in microseconds.
    """

    backend: str
    max_bytes: int | None
    #: bytes pinned, including pinning in flight
    reserved_bytes: int
    #: bytes of blocks handed out and not yet freed (views still alive count as held)
    active_bytes: int
    #: buffers handed out and not yet freed
    active_requests: int
    #: idle blocks in the cache
    free_blocks: int
    #: bytes of idle blocks in the cache
    free_bytes: int
    #: the same: what is pinned and idle (trimming's measure)
    cached_bytes: int
    #: idle bytes unpinned by trimming (``max_idle_bytes``, ``idle_timeout_s``), in all
    trimmed_bytes: int
    #: segments pinned (``reserve`` carves each into blocks)
    segments: int
    #: idle bytes that cannot be unpinned yet: blocks of segments with other blocks still out
    stranded_bytes: int
    #: times faulting in transparent huge pages collapsed and pinning fell back to 4 KiB pages
    huge_page_fallbacks: int
    #: reserves still running (``reserve``, ``start_reserve``): the bytes they were asked for,
    #: and those pinned so far (both 0 once every reserve has ended: the tier is up)
    reserve_target_bytes: int
    reserve_done_bytes: int
    #: events recorded on streams that have not been seen to complete
    pending_events: int
    #: callers awaiting a block
    waiters: int
    num_host_alloc: int
    num_host_free: int
    cache_hits: int
    cache_misses: int
    peak_reserved_bytes: int
    host_alloc_time_us_total: float
    host_alloc_time_us_max: float
    host_free_time_us_total: float
    host_free_time_us_max: float
    #: calls that had to queue for a block (under ``max_bytes``), and how long they waited
    num_waits: int
    wait_time_us_total: float
    wait_time_us_max: float
    #: how many ended waits, and pins, took at most each bound of ``TIME_BUCKETS_S`` (and more
    #: than the one before; the last count is for longer than the last bound)
    wait_time_buckets: tuple[int, ...]
    host_alloc_time_buckets: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain ``dict`` (ready for JSON)."""
        return asdict(self)


class Timing:
    """How many times something happened, and its total and longest durations (µs)."""

    __slots__ = ("buckets", "count", "max_us", "total_us")

    def __init__(self) -> None:
        self.count = 0
        self.total_us = 0.0
        self.max_us = 0.0
        self.buckets = [0] * (len(_BOUNDS_US) + 1)

    def add(self, us: float, count: int = 1) -> None:
        self.count += count
        self.total_us += us
        self.max_us = max(self.max_us, us)
        self.buckets[bisect_left(_BOUNDS_US, us)] += 1


class Counters:
    """The pool's running counts.

    Everything is written on the loop thread, except what the pinning threads report through
    :meth:`pinned` and :meth:`unpinned`, which take ``_lock`` (it guards ``pins`` and ``unpins``
    only).
    """

    __slots__ = (
        "_lock",
        "cache_hits",
        "cache_misses",
        "pins",
        "returned",
        "unpins",
        "waits",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        #: blocks that went back to the free list through the pool (after their events or
        #: scrub, or freed beside an idle sibling; ``process_events`` counts with it), not the
        #: ones ``PinnedBuffer.free`` put back itself
        self.returned = 0
        #: waits are counted when they begin (``waits.count``) and timed when they end
        self.waits = Timing()
        self.pins = Timing()
        self.unpins = Timing()

    def waited(self, us: float) -> None:
        """A wait (already counted when it began) ended after ``us`` microseconds."""
        self.waits.add(us, count=0)

    def pinned(self, us: float) -> None:
        """A block was pinned in ``us`` microseconds (any thread)."""
        with self._lock:
            self.pins.add(us)

    def unpinned(self, us: float) -> None:
        """A block was unpinned in ``us`` microseconds (any thread)."""
        with self._lock:
            self.unpins.add(us)

    def snapshot(self, **gauges: Any) -> PoolStats:
        """A :class:`PoolStats` of these counts and the pool's ``gauges`` (the other fields)."""
        pins, unpins, waits = self.pins, self.unpins, self.waits
        with self._lock:
            return PoolStats(
                **gauges,
                num_host_alloc=pins.count,
                num_host_free=unpins.count,
                cache_hits=self.cache_hits,
                cache_misses=self.cache_misses,
                host_alloc_time_us_total=pins.total_us,
                host_alloc_time_us_max=pins.max_us,
                host_free_time_us_total=unpins.total_us,
                host_free_time_us_max=unpins.max_us,
                num_waits=waits.count,
                wait_time_us_total=waits.total_us,
                wait_time_us_max=waits.max_us,
                wait_time_buckets=tuple(waits.buckets),
                host_alloc_time_buckets=tuple(pins.buckets),
            )


def taken_on_loop(port: LoopPort, take: Callable[[], PoolStats], timeout: float) -> PoolStats:
    """``take()`` on the pool's loop, from another thread: the loop changes the counts between
    any two reads, so only there is a snapshot one instant.  ``TimeoutError`` past ``timeout``
    seconds; where the loop has stopped nothing changes them, and ``take()`` runs here."""

    async def run() -> PoolStats:
        return take()

    try:
        return port.call(run, timeout=timeout, on_orphan=lambda _: None)
    except LoopGone:
        return take()
