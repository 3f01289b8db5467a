"""Growth: pinning a new block for one caller, from plan to block, whatever happens meanwhile.

A plan (``Cache.plan``: bytes reserved, idle victims taken out) runs in a thread
(``Pinning.grow``: unpin the victims, pin the block) and is settled on the loop:

* pinned: the block, registered, for the caller to hand out;
* refused (``PinnedMemoryError``): retried once after unpinning every idle block, as CuPy does
  (not for ``reserve``, which unpins nothing to make room);
* the pool closed meanwhile: ``PoolClosed``, the block (if any) cached for the close to unpin;
* a victim could not be unpinned: nothing was pinned; the victims still pinned are cached again
  (and stay counted, so the cap still holds), and the backend's error is raised;
* the caller left (cancelled, timed out): the thread's outcome is adopted when it ends, so a
  pinned block goes to the free list and a failure gives its reservation back.

Whatever comes back (blocks, or room) goes to ``give_back``, which returns the blocks and serves
the waiters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import anyio

from ._block import Block
from ._cache import Cache
from ._pinning import Pinning, StillPinned
from ._reservations import Plan
from ._stats import Counters
from ._waiters import InFlight
from .errors import PinnedMemoryError, PoolClosed

CLOSED_MESSAGE = "the pool was closed while this call pinned"


class Growth:
    __slots__ = ("_cache", "_counts", "_give_back", "_is_open", "pinning")

    def __init__(
        self,
        cache: Cache,
        counts: Counters,
        give_back: Callable[[list[Block]], None],
        is_open: Callable[[], bool],
    ) -> None:
        self._cache = cache
        self._counts = counts
        self._give_back = give_back
        #: whether the pool still hands out blocks (a pin that ends after it closed hands none)
        self._is_open = is_open
        #: pinning threads running, their outcome not yet settled (a closing pool waits)
        self.pinning = InFlight()

    async def grow(
        self, pinning: Pinning, plan: Plan, deadline: float, miss: int = 1, retry: bool = True
    ) -> Block:
        """Run ``plan``; the block it pinned (registered, not yet handed out).  ``retry``: on
        ``PinnedMemoryError``, unpin every idle block and try once more.

        Raises ``PoolClosed`` where the pool closed meanwhile (the block, if pinned, is cached
        for the close to unpin)."""
        self._counts.cache_misses += miss
        cache, retried = self._cache, not retry
        while True:
            self.pinning.started()  # finished here, or by _adopt if the caller leaves first
            try:
                with anyio.CancelScope(deadline=deadline) as scope:
                    ptr = await pinning.grow(plan, on_orphan=partial(self._adopt, plan))
            except StillPinned as exc:  # a victim could not be unpinned, so nothing was pinned
                self.pinning.finished()
                self._give_back(cache.settle_failed(plan, exc.blocks))
                raise exc.error from None
            except PinnedMemoryError as exc:
                self.pinning.finished()
                cache.settle_failed(plan)
                if not self._is_open():
                    self._give_back([])
                    raise PoolClosed(CLOSED_MESSAGE) from exc
                if retried or not cache.free:
                    self._give_back([])
                    raise
                retried = True  # as CuPy does: unpin every idle block and try once more
                plan = cache.plan_after_unpinning_all(plan.size)
                continue
            except Exception:  # the backend failed otherwise (a cancelled caller is adopted)
                self.pinning.finished()
                self._give_back(cache.settle_failed(plan))
                raise
            if scope.cancelled_caught:  # the block is adopted once it is pinned
                raise TimeoutError(f"pinning {plan.size} bytes did not finish in time")
            block = cache.settle_pinned(plan, ptr)
            if not self._is_open():  # (cached, for the closing pool to unpin with the rest)
                self._give_back([block])
                self.pinning.finished()
                raise PoolClosed(CLOSED_MESSAGE)
            self.pinning.finished()
            return block

    async def reserve(
        self,
        pinning: Pinning,
        total: int,
        block_bytes: int,
        progress: Callable[[int, int], object] | None,
    ) -> int:
        """Pin ``total`` bytes into the cache in blocks of ``block_bytes`` (the last one the
        remainder), one after another; the bytes pinned.

        Each block joins the free list as soon as it is pinned, so a cancelled reserve keeps
        what it pinned (and a block in flight is adopted).  Stops early where the cap leaves no
        room, and raises where the system refuses to pin more: it unpins no idle block for
        either.  Raises ``PoolClosed`` once the pool is closing.
        """
        done = 0
        while done < total:
            if not self._is_open():
                raise PoolClosed(CLOSED_MESSAGE)
            size = min(block_bytes, total - done)
            if self._cache.reservations.room() < size:
                break
            plan = self._cache.plan(size, exact=True)
            assert plan is not None and not plan.victims
            try:
                block = await self.grow(pinning, plan, math.inf, miss=0, retry=False)
            except PinnedMemoryError as exc:
                raise PinnedMemoryError(
                    f"reserve pinned {done} of {total} bytes (kept in the cache), then: {exc}"
                ) from exc
            self._give_back([block])
            done += block.size
            if progress is not None:
                progress(done, total)
        return done

    def _adopt(self, plan: Plan, ptr: int | None, error: BaseException | None) -> None:
        """Growth whose caller left: keep the block, or give back the reservation."""
        self.pinning.finished()
        if error is None and ptr is not None:
            self._give_back([self._cache.settle_pinned(plan, ptr)])
            return
        still = error.blocks if isinstance(error, StillPinned) else None
        self._give_back(self._cache.settle_failed(plan, still))
