"""Block: one pinned allocation, the seed's ``HostBlock``; Segment: one pinning carved into
blocks; and the seed's size rule."""

from __future__ import annotations

from collections.abc import Hashable

# Where a block is.  Transitions happen on the loop thread only.
FREE = 0  # idle, in the free list
ALLOCATED = 1  # handed out (and, after free(), still held by live views)
PENDING = 2  # freed; waiting for the events recorded on its streams (EventWatcher.after)
UNPINNED = 3  # given back to the system


#: the streams of a block that has none, shared: a block gets a set of its own only once a
#: stream is recorded on it (``add_stream``), so that a tier of a million idle blocks is a
#: million objects for the garbage collector's full passes, not two million
NO_STREAMS: frozenset[Hashable] = frozenset()


def add_stream(block: Block, key: Hashable) -> None:
    """``key`` joins ``block``'s streams (loop thread, or no loop left to race with)."""
    if isinstance(block.streams, set):
        block.streams.add(key)
    else:
        block.streams = {key}


def pow2(n: int) -> int:
    """The seed's ``PowerOf2Ceil``: the block size growth pins for a request of ``n`` bytes."""
    return 1 << (n - 1).bit_length()


class Block:
    __slots__ = ("graphs", "home", "idle_since", "odd", "ptr", "segment", "size", "state",
                 "streams")  # fmt: skip

    def __init__(self, ptr: int, size: int, odd: bool = False) -> None:
        self.ptr = ptr
        self.size = size
        #: not a size class (pinned to the exact request at a cap's edge): the free list's
        #: exact-class lookup cannot find it
        self.odd = odd
        #: when it last joined the free list (``time.monotonic()``; set where trimming is on)
        self.idle_since = 0.0
        self.state = FREE
        #: its size's list in the free list, once it has been idle there (a class size's list
        #: stays for the pool's life; an odd block has none): a buffer's free appends to it
        self.home: list[Block] | None = None
        #: streams that used the block while it was handed out (the seed's ``streams_``)
        self.streams: set[Hashable] | frozenset[Hashable] = NO_STREAMS
        #: captured CUDA graphs that may still read it (``_graphs``): it is not reused before
        #: the last of them is gone
        self.graphs = 0
        #: the segment it was carved from (``None``: a pinning of its own)
        self.segment: Segment | None = None

    def __repr__(self) -> str:
        state = ("free", "allocated", "pending", "unpinned")[self.state]
        return f"<Block {self.ptr:#x} size={self.size} {state}>"


class Segment(Block):
    """One pinning (one mapping) carved into blocks that live in the cache like any other.

    The segment itself is never handed out, idle or registered: it is what is unpinned, as one,
    once every block carved from it is idle (``FREE``: in the free list) or, the pool closed,
    retired (``UNPINNED``).  Its ``streams`` gather its retired blocks' streams, so that the
    unpin waits for them all.
    """

    __slots__ = ("blocks",)

    def __init__(self, ptr: int, sizes: list[int], odd: list[bool]) -> None:
        super().__init__(ptr, sum(sizes))
        self.blocks: list[Block] = []
        at = ptr
        for size, is_odd in zip(sizes, odd, strict=True):
            block = Block(at, size, is_odd)
            block.segment = self
            self.blocks.append(block)
            at += size

    def all_in(self, state: int) -> bool:
        return all(b.state == state for b in self.blocks)

    def __repr__(self) -> str:
        return f"<Segment {self.ptr:#x} size={self.size} of {len(self.blocks)} blocks>"
