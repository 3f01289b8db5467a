"""What is pinned: the registry of every block, the free list of idle ones, and the bytes
reserved under the cap, kept consistent with each other.

Every pinned block is in the registry from the moment it is pinned until it is taken out to be
unpinned; an idle block is also in the free list.  Growth is planned here (the reservation made,
the victims taken out of the free list and the registry at once) and settled here when the
pinning thread is done.  No loop, no threads: the pool calls it on its loop thread (``retire``
excepted: a pool whose loop is gone retires blocks from any thread).

What is unpinned is a *unit*: a block pinned on its own, or a segment (``Segment``), once every
block carved from it is idle; never a carved block alone (``units``).  A victim, or a block taken
idle, may so be a segment: taking it out takes out all its blocks, and putting it back
(``_restore``) puts them all back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

from ._block import ALLOCATED, FREE, PENDING, UNPINNED, Block, Segment
from ._freelist import FreeList
from ._registry import Registry
from ._reservations import Plan, Reservations
from ._sizes import Sizes

#: blocks ``empty_cache`` takes out per loop step (about 2-5 ms of loop time)
EMPTY_STEP_BLOCKS = 2048


class Cache:
    __slots__ = ("free", "registry", "reservations", "segments", "trimmed_bytes")

    def __init__(self, max_bytes: int | None, rounding: str = "fine") -> None:
        sizes = Sizes(rounding, capped=max_bytes is not None)
        self.free = FreeList(sizes)
        self.registry = Registry()
        self.reservations = Reservations(max_bytes, sizes.grow)
        #: the segments pinned and not yet unpinned (only its size is read off the loop)
        self.segments: set[Segment] = set()
        #: idle bytes unpinned by trimming, in all
        self.trimmed_bytes = 0

    def trimmed(self, blocks: list[Block]) -> None:
        self.trimmed_bytes += sum(b.size for b in blocks)

    def plan(self, size: int, exact: bool = False) -> Plan | None:
        """Room to pin a block for ``size`` bytes (victims taken out), or ``None``; ``exact``
        pins exactly ``size`` (no rounding)."""
        free = self.free
        plan = self.reservations.plan(size, free.nbytes, units(free.largest_first()), exact)
        if plan is not None:
            self.take_out(plan.victims)
        return plan

    def plan_after_unpinning_all(self, size: int) -> Plan:
        """Pin ``size`` bytes after unpinning every idle block (the out-of-memory retry).

        Fits under the cap whenever a plan for ``size`` did, since every idle block goes.
        """
        return self.reservations.grant(Plan(size, self.take_idle()))

    def settle_pinned(self, plan: Plan, ptr: int) -> list[Block]:
        """``plan``'s thread pinned at ``ptr``: its block, or the blocks carved from it,
        registered."""
        self.reservations.settle(plan, pinned=True)
        grow = self.free.sizes.grow
        if plan.carve:
            odd = {n: grow(n) != n for n in set(plan.carve)}  # (one or two sizes: its pages)
            segment = Segment(ptr, plan.carve, [odd[n] for n in plan.carve])
            return self._restore([segment])
        return [self.register(Block(ptr, plan.size, grow(plan.size) != plan.size))]

    def settle_failed(self, plan: Plan, still_pinned: list[Block] | None = None) -> list[Block]:
        """``plan``'s thread ran and pinned nothing.  Its victims are unpinned, but for
        ``still_pinned`` (their unpin failed): those are registered again and returned, for the
        caller to return to the free list, and stay counted."""
        still = still_pinned or []
        self.reservations.settle(plan, pinned=False, still_pinned=sum(b.size for b in still))
        return self._restore(still)

    def unpinned(self, units: list[Block], still_pinned: list[Block]) -> list[Block]:
        """``units`` from ``take_idle`` were unpinned, but for ``still_pinned``: those are
        registered again and returned, and stay counted."""
        self.reservations.unpinned(sum(u.size for u in units if u not in still_pinned))
        return self._restore(still_pinned)

    def undo(self, plan: Plan) -> list[Block]:
        """``plan`` never ran: its victims, registered again, for the caller to return."""
        self.reservations.undo(plan)
        return self._restore(plan.victims)

    def _restore(self, units: list[Block]) -> list[Block]:
        """Units out of the cache that stay pinned: their blocks, registered again, for the
        caller to return to the free list."""
        blocks = blocks_of(units)
        for unit in units:
            unit.state = FREE
            if isinstance(unit, Segment):
                self.segments.add(unit)
        self.registry.add_many(blocks)
        for block in blocks:
            block.state = PENDING
        return blocks

    def register(self, block: Block) -> Block:
        """In the registry, on its way to its caller or the free list (``FREE`` means in the
        free list: a segment is idle once all its blocks are)."""
        self.registry.add(block)
        block.state = PENDING
        return block

    def forget(self, block: Block) -> None:
        """Out of the registry: the block (a segment: its blocks) is on its way to being
        unpinned (still reserved).  A block already forgotten stays so."""
        self.forget_all([block])

    def forget_all(self, units: list[Block]) -> None:
        """``forget`` each of ``units``, the registry's bookkeeping done once for all."""
        blocks = blocks_of(units)
        self.registry.remove_many([b for b in blocks if b.state != UNPINNED])
        for block in blocks:
            block.state = UNPINNED
        for unit in units:
            unit.state = UNPINNED
            if isinstance(unit, Segment):
                self.segments.discard(unit)

    def take_out(self, units: list[Block]) -> None:
        """Idle units (from ``units``) out of the free list and the registry, to be unpinned."""
        self.free.remove_many(blocks_of(units))
        self.forget_all(units)

    def take_idle(self, closing: bool = False) -> list[Block]:
        """Every idle unit, out of the free list and the registry (still reserved).

        A segment with blocks still out stays; its idle blocks stay idle, or, ``closing``, are
        retired with it (the segment is unpinned once its last block is retired)."""
        idle = self.free.take_all()
        taken = list(units(idle))
        self.forget_all(taken)
        rest = [b for b in idle if b.state != UNPINNED]  # (of segments with blocks still out)
        if closing:
            self.forget_all(rest)
        else:
            self.free.add_many(rest)
        return taken

    def idle_steps(self, limit: int = EMPTY_STEP_BLOCKS) -> Iterator[list[Block]]:
        """The units idle now, out of the free list and the registry (still reserved) a step of
        about ``limit`` blocks (whole segments) at a time, as the caller asks for the next
        step: a unit is looked at when its step comes, and one handed out meanwhile is passed
        over."""
        walk = units(self.free.blocks())  # (a segment is checked as it is yielded)
        while True:
            taken, count = [], 0
            for unit in walk:
                if isinstance(unit, Segment) or unit.state == FREE:
                    taken.append(unit)
                    count += len(unit.blocks) if isinstance(unit, Segment) else 1
                    if count >= limit:
                        break
            if not taken:
                return
            self.take_out(taken)
            yield taken

    def retire(self, block: Block) -> Block | None:
        """The pool is closed (or its loop gone; any thread): ``block`` is done for good.  The
        unit to unpin now: the block, or its segment once this was its last block, or None."""
        self.forget(block)
        segment = block.segment
        if segment is None:
            return block
        with _RETIRING:
            segment.streams |= block.streams
            if segment.state == UNPINNED or not segment.all_in(UNPINNED):
                return None
            segment.state = UNPINNED
            self.segments.discard(segment)
        return segment

    def gauges(self) -> dict[str, int]:
        """What is pinned now, as :class:`~aiopinned.PoolStats` fields: one pass over the
        registry, and one over the blocks not idle (the hit path counts nothing)."""
        r, blocks = self.reservations, self.registry.blocks()
        out = [b for b in blocks if b.state != FREE]  # handed out, or on their way back
        busy: dict[Segment, int] = {}  # a segment with blocks out: their bytes
        for block in out:
            if (segment := block.segment) is not None:
                busy[segment] = busy.get(segment, 0) + block.size
        # Stranded: the idle blocks of segments with blocks out.  While anything is idle, every
        # block of a segment is registered (blocks are forgotten one by one only at close, which
        # leaves nothing idle), so a busy segment's idle bytes are its size less those out.
        stranded = sum(s.size - n for s, n in busy.items()) if self.free else 0
        active = [b.size for b in out if b.state == ALLOCATED]
        return {
            "segments": len(self.segments),
            "stranded_bytes": stranded,
            "active_bytes": sum(active),
            "active_requests": len(active),
            "reserved_bytes": r.reserved,
            "peak_reserved_bytes": r.peak,
            "free_blocks": len(self.free),
            "free_bytes": self.free.nbytes,
            "cached_bytes": self.free.nbytes,
            "trimmed_bytes": self.trimmed_bytes,
        }

    def find_live(self, ptr: int) -> Block | None:
        """The handed-out block that holds address ``ptr``, or ``None``."""
        block = self.registry.find(ptr)
        return block if block is not None and block.state == ALLOCATED else None


_RETIRING = threading.Lock()  # (a segment's last retired block is found once, whatever thread)


def blocks_of(units: Iterable[Block]) -> list[Block]:
    """The blocks of ``units``: a segment's carved blocks, a block itself."""
    return [b for u in units for b in (u.blocks if isinstance(u, Segment) else (u,))]


def units(idle: Iterable[Block], every: Callable[[Block], bool] | None = None) -> Iterator[Block]:
    """``idle`` blocks as what can be unpinned, in their order: a block pinned on its own, or,
    at its first carved block, a segment all of whose blocks are idle (and pass ``every``)."""
    seen: set[Segment] = set()
    for block in idle:
        segment = block.segment
        if segment is None:
            yield block
        elif segment not in seen:
            seen.add(segment)
            if segment.all_in(FREE) and (every is None or all(map(every, segment.blocks))):
                yield segment
