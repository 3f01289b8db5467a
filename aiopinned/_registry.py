"""The registry: every block the pool has pinned, by address (the seed's ``blocks_``).

It answers one question besides membership: which block holds an address, anywhere inside it
(``record_stream`` with a raw pointer or a view that starts mid-block).  Foreign threads read it,
so it has a lock; the lock guards the dict and the sorted starts and nothing else, and is held for
their operations only.
"""

from __future__ import annotations

import threading

from sortedcontainers import SortedList

from ._block import Block
from ._sorted import merge


class Registry:
    """Pinned blocks by start address, with interior-pointer lookup."""

    __slots__ = ("_blocks", "_lock", "_starts")

    def __init__(self) -> None:
        self._blocks: dict[int, Block] = {}
        self._starts = SortedList()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: Block) -> bool:
        return self._blocks.get(block.ptr) is block

    def add(self, block: Block) -> None:
        self.add_many([block])

    def add_many(self, blocks: list[Block]) -> None:
        """``add`` for many blocks at once (a carved segment's)."""
        new = {block.ptr: block for block in blocks}
        with self._lock:
            if len(new) < len(blocks) or not self._blocks.keys().isdisjoint(new):
                raise ValueError(f"one of {len(blocks)} blocks overlaps a registered block")
            self._blocks.update(new)
            merge(self._starts, new)

    def remove_many(self, blocks: list[Block]) -> None:
        """``remove`` for many blocks at once (a tier emptied): the sorted starts are rebuilt
        where that is cheaper than one removal each."""
        with self._lock:
            for block in blocks:
                del self._blocks[block.ptr]
            if len(blocks) * 8 < len(self._starts):
                for block in blocks:
                    self._starts.remove(block.ptr)
            else:
                self._starts = SortedList(self._blocks)

    def remove(self, block: Block) -> None:
        self.remove_many([block])

    def blocks(self) -> list[Block]:
        with self._lock:
            return list(self._blocks.values())

    def find(self, ptr: int) -> Block | None:
        """The block whose memory holds address ``ptr``, or ``None``."""
        with self._lock:
            i = self._starts.bisect_right(ptr) - 1
            if i < 0:
                return None
            block = self._blocks[self._starts[i]]
        return block if ptr < block.ptr + block.size else None
