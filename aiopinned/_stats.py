"""PoolStats, a frozen snapshot of a pool's counters, and Counters, the running counts."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any


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

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain ``dict`` (ready for JSON)."""
        return asdict(self)


class Counters:
    """The pool's running counts.

    Everything is written on the loop thread, except what the pinning threads report through
    :meth:`pinned` and :meth:`unpinned`, which take ``_lock`` (it guards those six fields only).
    """

    __slots__ = (
        "_lock",
        "active_bytes",
        "active_requests",
        "alloc_us",
        "alloc_us_max",
        "cache_hits",
        "cache_misses",
        "free_us",
        "free_us_max",
        "num_alloc",
        "num_free",
        "num_waits",
        "returned",
        "wait_us",
        "wait_us_max",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: bytes and buffers handed out and not yet taken back
        self.active_bytes = 0
        self.active_requests = 0
        self.cache_hits = 0
        self.cache_misses = 0
        #: blocks that went back to the free list (``process_events`` counts with it)
        self.returned = 0
        self.num_waits = 0
        self.wait_us = 0.0
        self.wait_us_max = 0.0
        self.num_alloc = 0
        self.alloc_us = 0.0
        self.alloc_us_max = 0.0
        self.num_free = 0
        self.free_us = 0.0
        self.free_us_max = 0.0

    def waited(self, us: float) -> None:
        """A wait (counted in ``num_waits`` when it began) ended after ``us`` microseconds."""
        self.wait_us += us
        self.wait_us_max = max(self.wait_us_max, us)

    def pinned(self, us: float) -> None:
        """A block was pinned in ``us`` microseconds (any thread)."""
        with self._lock:
            self.num_alloc += 1
            self.alloc_us += us
            self.alloc_us_max = max(self.alloc_us_max, us)

    def unpinned(self, us: float) -> None:
        """A block was unpinned in ``us`` microseconds (any thread)."""
        with self._lock:
            self.num_free += 1
            self.free_us += us
            self.free_us_max = max(self.free_us_max, us)

    def snapshot(self, **gauges: Any) -> PoolStats:
        """A :class:`PoolStats` of these counts and the pool's ``gauges`` (the other fields)."""
        with self._lock:
            return PoolStats(
                **gauges,
                active_bytes=self.active_bytes,
                active_requests=self.active_requests,
                num_host_alloc=self.num_alloc,
                num_host_free=self.num_free,
                cache_hits=self.cache_hits,
                cache_misses=self.cache_misses,
                host_alloc_time_us_total=self.alloc_us,
                host_alloc_time_us_max=self.alloc_us_max,
                host_free_time_us_total=self.free_us,
                host_free_time_us_max=self.free_us_max,
                num_waits=self.num_waits,
                wait_time_us_total=self.wait_us,
                wait_time_us_max=self.wait_us_max,
            )
