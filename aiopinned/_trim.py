"""Trimming: unpinning idle (cached) memory that a server no longer needs, off the loop.

Two bounds, both off by default (a cache exists to be reused: pinning 1 GiB costs 50-600 ms, so
a pool keeps what it pinned unless told otherwise):

* ``max_idle_bytes``: whenever a block comes back and the idle bytes exceed it, the blocks idle
  the longest are unpinned until they do not;
* ``idle_timeout_s``: blocks idle longer than this are unpinned, checked every half of it.

Unpinning runs in a thread (``Pinning.unpin_soon``); the pool settles the bytes when it is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ._block import Block
from ._cache import Cache
from ._loopport import LoopPort
from ._pinning import Pinning


class Trim:
    __slots__ = (
        "_cache",
        "_cancel",
        "_done",
        "_pinning",
        "_port",
        "idle_s",
        "max_idle_bytes",
        "on",
    )

    def __init__(self, cache: Cache, max_idle_bytes: int | None, idle_s: float | None) -> None:
        self._cache = cache
        self.max_idle_bytes, self.idle_s = max_idle_bytes, idle_s
        #: either bound set (the free path's one check)
        self.on = max_idle_bytes is not None or idle_s is not None
        self._cancel: Callable[[], None] | None = None

    def start(
        self, port: LoopPort, pinning: Pinning, done: Callable[[list[Block], list[Block]], None]
    ) -> None:
        """Open: trim through ``pinning``; ``done(victims, still_pinned)`` settles each trim."""
        self._port, self._pinning, self._done = port, pinning, done
        if self.idle_s is not None:
            self._cancel = port.call_later(self.idle_s / 2, self._tick)

    def stop(self) -> None:
        if self._cancel is not None:
            self._cancel()
            self._cancel = None

    def returned(self, block: Block) -> None:
        """Loop thread: ``block`` has just joined the free list."""
        block.idle_since = time.monotonic()
        free = self._cache.free
        if self.max_idle_bytes is not None and free.nbytes > self.max_idle_bytes:
            over, victims = free.nbytes - self.max_idle_bytes, []
            for idle in sorted(free.blocks(), key=lambda b: b.idle_since):
                if over <= 0:
                    break
                victims.append(idle)
                over -= idle.size
            self._unpin(victims)

    def _tick(self) -> None:
        assert self.idle_s is not None
        old = time.monotonic() - self.idle_s
        self._unpin([b for b in self._cache.free.blocks() if b.idle_since <= old])
        self._cancel = self._port.call_later(self.idle_s / 2, self._tick)

    def _unpin(self, victims: list[Block]) -> None:
        if victims:
            for block in victims:
                self._cache.free.remove(block)
                self._cache.forget(block)
            self._cache.trimmed(victims)
            self._pinning.unpin_soon(victims, then=lambda still: self._done(victims, still))
