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
from collections.abc import Callable, Iterator
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

#: ``PinnedPool(segment_bytes=)``'s default: the most one pinning covers when ``reserve`` carves.
#: Pinning costs about 50 ms per GiB with registration (DESIGN.md: 1 GiB 53 ms, 4 GiB 223 ms:
#: linear, so larger segments save nothing per byte), so a 1 GiB segment is one short call: a
#: cancelled reserve or a closing pool waits at most that long, a 100 GB tier is 100 calls, not
#: 50,000, and trimming can still give back a tier in 1 GiB steps.
SEGMENT_BYTES = 1 << 30
#: the most blocks one segment is carved into: settling a segment makes, registers and returns
#: each of its blocks on the loop (about 4 µs each on CI's machine), so 1024 bound that step to
#: about 4-5 ms; a tier of small pages gets smaller segments (4 KiB pages: 4 MiB; 64 KiB:
#: 64 MiB; 2 MiB pages: 1 GiB, 512 blocks)
MAX_CARVED = 1024


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

    async def grow(self, pinning: Pinning, plan: Plan, deadline: float) -> Block:
        """Run ``plan`` for one caller; the block it pinned (registered, not yet handed out).
        On ``PinnedMemoryError``, unpin every idle block and try once more.

        Raises ``PoolClosed`` where the pool closed meanwhile (the block, if pinned, is cached
        for the close to unpin)."""
        return (await self._run(pinning, plan, deadline))[0]

    async def _run(
        self, pinning: Pinning, plan: Plan, deadline: float, miss: int = 1, retry: bool = True
    ) -> list[Block]:
        """Run ``plan``: the blocks it pinned (one, or those carved from a segment), registered.
        ``retry``: on ``PinnedMemoryError``, unpin every idle block and try once more."""
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
            blocks = cache.settle_pinned(plan, ptr)
            if not self._is_open():  # (cached, for the closing pool to unpin with the rest)
                self._give_back(blocks)
                self.pinning.finished()
                raise PoolClosed(CLOSED_MESSAGE)
            self.pinning.finished()
            return blocks

    async def reserve(
        self,
        pinning: Pinning,
        total: int,
        block_bytes: int,
        segment_bytes: int,
        progress: Callable[[int, int], object] | None,
    ) -> int:
        """Pin ``total`` bytes into the cache, one segment (one pinning) after another, each
        carved into blocks of ``block_bytes`` (the last one the remainder); the bytes pinned.

        A segment holds as many whole blocks as fit in ``segment_bytes`` (one, where a block is
        larger).  Its blocks join the free list as soon as it is pinned, so a cancelled reserve
        keeps whole segments (and a segment in flight is adopted).  Where the cap leaves too
        little room, pins the blocks that fit and stops; where the system refuses to pin more,
        raises: it unpins no idle block for either.  Raises ``PoolClosed`` once the pool is
        closing.
        """
        done = 0
        for pieces in layout(total, block_bytes, segment_bytes):
            if not self._is_open():
                raise PoolClosed(CLOSED_MESSAGE)
            room, asked, size = self._cache.reservations.room(), len(pieces), sum(pieces)
            while pieces and size > room:
                size -= pieces.pop()  # (the cap: the blocks that fit, then stop)
            if not pieces:
                break
            plan = self._cache.plan(size, exact=True)
            assert plan is not None and not plan.victims
            plan.carve = pieces if len(pieces) > 1 else []
            try:
                blocks = await self._run(pinning, plan, math.inf, miss=0, retry=False)
            except PinnedMemoryError as exc:
                raise PinnedMemoryError(
                    f"reserve pinned {done} of {total} bytes (kept in the cache), then: {exc}"
                ) from exc
            self._give_back(blocks)
            done += size
            if progress is not None:
                progress(done, total)
            if len(pieces) < asked:
                break
        return done

    def _adopt(self, plan: Plan, ptr: int | None, error: BaseException | None) -> None:
        """Growth whose caller left: keep the block, or give back the reservation."""
        self.pinning.finished()
        if error is None and ptr is not None:
            self._give_back(self._cache.settle_pinned(plan, ptr))
            return
        still = error.blocks if isinstance(error, StillPinned) else None
        self._give_back(self._cache.settle_failed(plan, still))


def layout(total: int, block_bytes: int, segment_bytes: int) -> Iterator[list[int]]:
    """The block sizes of each segment that reserving ``total`` bytes pins: as many blocks of
    ``block_bytes`` as fit in ``segment_bytes`` (at least one, at most ``MAX_CARVED``), the
    last block the remainder."""
    per, done = max(1, min(segment_bytes // max(block_bytes, 1), MAX_CARVED)), 0
    while done < total:
        count = min(per, (total - done) // block_bytes)
        pieces = [block_bytes] * count
        rest = total - done - count * block_bytes
        if count < per and rest:  # (the last segment: the remainder is its last block)
            pieces.append(rest)
        done += sum(pieces)
        yield pieces
