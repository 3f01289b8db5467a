"""PoolStats: a frozen snapshot of a pool's counters."""

from __future__ import annotations

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
