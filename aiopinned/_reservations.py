"""Reservation accounting: how many bytes are pinned, or may be by work in flight, under the cap.

Changing how much memory is pinned spans an ``await`` (pinning takes up to seconds, in a thread),
so it is split in three: a :class:`Plan` is made on the loop (the bytes are reserved against
``max_bytes`` at once, and the idle blocks to unpin first, the *victims*, chosen), the thread
unpins the victims and pins the block, and the plan is *settled* on the loop with what really
happened.  A plan whose caller left before its thread started is *undone*.

Invariant: ``reserved`` bounds what is pinned at every instant, not only between plans.  Victims
stay counted until they are really unpinned, so no other plan can pin into room that a victim
still occupies; and ``reserved <= max_bytes`` always.

Plain integers, no loop and no lock: the pool changes them on its loop thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._block import Block, pow2


class Plan:
    """Growth granted to one caller: unpin ``victims``, then pin ``size`` bytes (as one block,
    or as a segment carved into blocks of the sizes in ``carve``).

    ``charge`` is what making the plan added to ``reserved``: ``size - freed`` where positive.
    """

    __slots__ = ("carve", "charge", "freed", "size", "victims")

    def __init__(self, size: int, victims: list[Block], carve: list[int] | None = None) -> None:
        self.size = size
        self.carve = carve or []
        self.victims = victims
        self.freed = sum(b.size for b in victims)
        self.charge = max(size - self.freed, 0)

    def __repr__(self) -> str:
        return f"<Plan pin {self.size} after unpinning {len(self.victims)} ({self.freed} bytes)>"


class Reservations:
    """The cap, the bytes reserved under it, and the peak."""

    __slots__ = ("grow", "max_bytes", "peak", "reserved")

    def __init__(self, max_bytes: int | None, grow: Callable[[int], int] = pow2) -> None:
        self.max_bytes = max_bytes
        self.grow = grow  #: the block size growth pins for a request (``Sizes.grow``)
        #: bytes pinned, being pinned, or being unpinned
        self.reserved = 0
        self.peak = 0

    def room(self) -> int:
        """Bytes that can still be pinned without unpinning anything."""
        return (1 << 80) if self.max_bytes is None else self.max_bytes - self.reserved

    def plan(
        self, size: int, idle_bytes: int, idle: Iterable[Block], exact: bool = False
    ) -> Plan | None:
        """Room to pin a block for a request of ``size`` bytes, or ``None`` if the cap forbids it.

        The block is ``grow(size)`` (its size class) unless that does not fit under the cap, then
        exactly ``size``.  Where the cap is in the way, idle blocks (``idle``, largest first,
        ``idle_bytes`` in all) become victims until there is room; the caller takes them out of
        the cache.  (``idle`` may yield fewer bytes than ``idle_bytes``: a segment's idle blocks
        count there, but the segment is a victim only once all of its blocks are idle.)
        """
        want = size if exact else self.grow(size)
        victims: list[Block] = []
        if self.max_bytes is not None:
            room = self.max_bytes - self.reserved
            if size > room:
                if room + idle_bytes < size:
                    return None
                for block in idle:
                    victims.append(block)
                    room += block.size
                    if room >= size:
                        break
                else:  # (a segment not wholly idle: fewer unpinnable bytes than idle_bytes)
                    return None
            if want > room:
                want = size
        return self.grant(Plan(want, victims))

    def grant(self, plan: Plan) -> Plan:
        """Reserve ``plan``'s charge (the caller has checked that it fits)."""
        self.reserved += plan.charge
        self.peak = max(self.peak, self.reserved)
        return plan

    def settle(self, plan: Plan, pinned: bool, still_pinned: int = 0) -> None:
        """``plan``'s thread ran: its victims are unpinned (but for ``still_pinned`` bytes of
        them, whose unpin failed), and its block pinned or not."""
        self.reserved += (plan.size if pinned else 0) - (plan.freed - still_pinned) - plan.charge

    def undo(self, plan: Plan) -> None:
        """``plan`` never ran: its victims are still pinned (the caller caches them again)."""
        self.reserved -= plan.charge

    def unpinned(self, nbytes: int) -> None:
        """Blocks of ``nbytes`` in all, counted until now, were unpinned outside any plan."""
        self.reserved -= nbytes
