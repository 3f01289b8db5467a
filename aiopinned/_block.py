"""Block: one pinned allocation, the seed's ``HostBlock``."""

from __future__ import annotations

from collections.abc import Hashable

# Where a block is.  Transitions happen on the loop thread only.
FREE = 0  # idle, in the free list
ALLOCATED = 1  # handed out (and, after free(), still held by live views)
PENDING = 2  # freed; waiting for events recorded on its streams
RELEASED = 3  # returned to the system


class Block:
    __slots__ = ("event_count", "ptr", "size", "state", "streams")

    def __init__(self, ptr: int, size: int) -> None:
        self.ptr = ptr
        self.size = size
        self.state = FREE
        #: streams that used the block while it was handed out (the seed's ``streams_``)
        self.streams: set[Hashable] = set()
        #: events still outstanding after free (the seed's ``event_count_``)
        self.event_count = 0

    def __repr__(self) -> str:
        state = ("free", "allocated", "pending", "released")[self.state]
        return f"<Block {self.ptr:#x} size={self.size} {state}>"
