"""Trimming: unpinning idle (cached) memory that a server no longer needs, off the loop.

Two bounds, both off by default (a cache exists to be reused: pinning 1 GiB costs 50-600 ms, so
a pool keeps what it pinned unless told otherwise):

* ``max_idle_bytes``: whenever a block comes back and the idle bytes exceed it, the blocks idle
  the longest are unpinned until they do not;
* ``idle_timeout_s``: blocks idle longer than this are unpinned, checked every half of it.

Unpinning runs in a thread (``Pinning.unpin_soon``); the pool settles the bytes when it is done,
and only what was unpinned counts as trimmed.  A block whose unpin failed goes back to the free
list and is not tried again for a while (``RETRY_S``, doubling on each failure up to
``RETRY_MAX_S``), so a failing unpin costs a thread and a log line per back-off, not a storm.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from ._block import Block
from ._cache import Cache, units
from ._loopport import LoopPort
from ._pinning import Pinning

#: seconds before a block whose unpin failed is tried again, doubling up to ``RETRY_MAX_S``
RETRY_S = 1.0
RETRY_MAX_S = 60.0


class Trim:
    __slots__ = (
        "_cache",
        "_cancel",
        "_done",
        "_failed",
        "_pinning",
        "_port",
        "_stuck",
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
        #: blocks whose unpin failed: when to try again, and the back-off after that
        self._failed: dict[Block, tuple[float, float]] = {}
        #: the last bound found too few idle bytes it could unpin (carved blocks of segments in
        #: use): until the idle bytes fall under the bound, only a returned block can change that
        self._stuck = False

    def start(
        self, port: LoopPort, pinning: Pinning, done: Callable[[list[Block], list[Block]], None]
    ) -> None:
        """Open: trim through ``pinning``; ``done(victims, still_pinned)`` settles each trim."""
        self._port, self._pinning, self._done = port, pinning, done
        if self.idle_s is not None:
            self._cancel = port.call_later(self.idle_s / 2, self._tick)

    def stop(self) -> None:
        self.on = False  # (a back-off's retry that is still due finds nothing to do)
        self._failed.clear()
        if self._cancel is not None:
            self._cancel()
            self._cancel = None

    def returned(self, block: Block) -> None:
        """Loop thread: ``block`` has just joined the free list."""
        if (block.segment or block) not in self._failed:  # (a failed one keeps its age)
            block.idle_since = time.monotonic()
        if self._stuck and self._cache.free.nbytes > (self.max_idle_bytes or 0):
            # (no need to sort every idle block again: only this block, or the segment it
            # completes, can have become unpinnable)
            self._unpin([u for u in units([block]) if u not in self._failed])
            return
        self._bound()

    def _bound(self) -> None:
        """Unpin the oldest idle blocks past ``max_idle_bytes`` (those in back-off excepted)."""
        free, self._stuck = self._cache.free, False
        if self.on and self.max_idle_bytes is not None and free.nbytes > self.max_idle_bytes:
            over, victims = free.nbytes - self.max_idle_bytes, []
            for unit in units(sorted(self._tryable(), key=lambda b: b.idle_since)):
                if over <= 0:
                    break
                victims.append(unit)
                over -= unit.size
            self._stuck = over > 0 and not self._failed
            self._unpin(victims)

    def _tick(self) -> None:
        assert self.idle_s is not None
        old = time.monotonic() - self.idle_s
        aged = [b for b in self._tryable() if b.idle_since <= old]
        self._unpin(list(units(aged, every=lambda b: b.idle_since <= old)))
        self._cancel = self._port.call_later(self.idle_s / 2, self._tick)

    def _retry(self, block: Block) -> None:
        """A failed block's back-off is over (timers may fire a little early: it is due now)."""
        if block in self._failed:
            self._failed[block] = (0.0, self._failed[block][1])
            self._bound()

    def _tryable(self) -> list[Block]:
        """The idle blocks, but for those whose failed unpin (a carved block: its segment's) is
        not to be tried again yet."""
        blocks, failed = self._cache.free.blocks(), self._failed
        if not failed:
            return blocks
        now = time.monotonic()
        return [b for b in blocks if failed.get(b.segment or b, (0.0,))[0] <= now]

    def _unpin(self, victims: list[Block]) -> None:
        """Unpin idle units (blocks, or wholly idle segments) in a thread."""
        if victims:
            self._cache.take_out(victims)
            self._pinning.unpin_soon(victims, then=lambda still: self._settled(victims, still))

    def _settled(self, victims: list[Block], still: list[Block]) -> None:
        """Loop thread: the trim's thread is done; ``still`` could not be unpinned."""
        failed, now = self._failed, time.monotonic()
        self._cache.trimmed([b for b in victims if b not in still])
        for block in victims:
            if block in still:
                wait = min(failed[block][1] * 2, RETRY_MAX_S) if block in failed else RETRY_S
                failed[block] = (now + wait, wait)
                self._port.call_later(wait, partial(self._retry, block))
            else:
                failed.pop(block, None)
        self._done(victims, still)
