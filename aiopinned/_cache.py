"""What is pinned: the registry of every block, the free list of idle ones, and the bytes
reserved under the cap, kept consistent with each other.

Every pinned block is in the registry from the moment it is pinned until it is taken out to be
unpinned; an idle block is also in the free list.  Growth is planned here (the reservation made,
the victims taken out of the free list and the registry at once) and settled here when the
pinning thread is done.  No loop, no threads: the pool calls it on its loop thread.
"""

from __future__ import annotations

from ._block import ALLOCATED, FREE, UNPINNED, Block
from ._freelist import FreeList
from ._registry import Registry
from ._reservations import Plan, Reservations
from ._sizes import Sizes


class Cache:
    __slots__ = ("free", "registry", "reservations", "trimmed_bytes")

    def __init__(self, max_bytes: int | None, rounding: str = "fine") -> None:
        sizes = Sizes(rounding, capped=max_bytes is not None)
        self.free = FreeList(sizes)
        self.registry = Registry()
        self.reservations = Reservations(max_bytes, sizes.grow)
        #: idle bytes unpinned by trimming, in all
        self.trimmed_bytes = 0

    def trimmed(self, blocks: list[Block]) -> None:
        self.trimmed_bytes += sum(b.size for b in blocks)

    def plan(self, size: int, exact: bool = False) -> Plan | None:
        """Room to pin a block for ``size`` bytes (victims taken out), or ``None``; ``exact``
        pins exactly ``size`` (no rounding)."""
        free = self.free
        plan = self.reservations.plan(size, free.nbytes, free.largest_first(), exact)
        if plan is not None:
            for block in plan.victims:
                free.remove(block)
                self.forget(block)
        return plan

    def plan_after_unpinning_all(self, size: int) -> Plan:
        """Pin ``size`` bytes after unpinning every idle block (the out-of-memory retry).

        Fits under the cap whenever a plan for ``size`` did, since every idle block goes.
        """
        return self.reservations.grant(Plan(size, self.take_idle()))

    def settle_pinned(self, plan: Plan, ptr: int) -> Block:
        """``plan``'s thread pinned a block at ``ptr``: it, registered."""
        self.reservations.settle(plan, pinned=True)
        odd = self.free.sizes.grow(plan.size) != plan.size
        return self.register(Block(ptr, plan.size, odd))

    def settle_failed(self, plan: Plan, still_pinned: list[Block] | None = None) -> list[Block]:
        """``plan``'s thread ran and pinned nothing.  Its victims are unpinned, but for
        ``still_pinned`` (their unpin failed): those are registered again and returned, for the
        caller to return to the free list, and stay counted."""
        still = still_pinned or []
        self.reservations.settle(plan, pinned=False, still_pinned=sum(b.size for b in still))
        return [self.register(block) for block in still]

    def unpinned(self, blocks: list[Block], still_pinned: list[Block]) -> list[Block]:
        """``blocks`` from ``take_idle`` were unpinned, but for ``still_pinned``: those are
        registered again and returned, and stay counted."""
        self.reservations.unpinned(sum(b.size for b in blocks if b not in still_pinned))
        return [self.register(block) for block in still_pinned]

    def undo(self, plan: Plan) -> list[Block]:
        """``plan`` never ran: its victims, registered again, for the caller to return."""
        self.reservations.undo(plan)
        return [self.register(block) for block in plan.victims]

    def register(self, block: Block) -> Block:
        self.registry.add(block)
        block.state = FREE
        return block

    def forget(self, block: Block) -> None:
        """Out of the registry: the block is on its way to being unpinned (still reserved).
        A block already forgotten stays so."""
        if block.state != UNPINNED:
            self.registry.remove(block)
            block.state = UNPINNED

    def take_idle(self) -> list[Block]:
        """Every idle block, out of the free list and the registry (still reserved)."""
        victims = self.free.take_all()
        for block in victims:
            self.forget(block)
        return victims

    def gauges(self) -> dict[str, int]:
        """What is pinned now, as :class:`~aiopinned.PoolStats` fields."""
        r = self.reservations
        active = [b.size for b in self.registry.blocks() if b.state == ALLOCATED]
        return {
            "active_bytes": sum(active),  # (counted here, so that the hit path counts nothing)
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
