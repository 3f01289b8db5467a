"""Idle blocks ordered by ``(size, ptr)``: the seed's ``free_list_`` with its ``lower_bound``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

if TYPE_CHECKING:
    from ._block import Block

_PTR_BITS = 64
_PTR_MASK = (1 << _PTR_BITS) - 1


class FreeList:
    """Best fit: ``take(n)`` pops the smallest idle block of at least ``n`` bytes.

    Each block is keyed by the single integer ``size << 64 | ptr``, which sorts exactly as the
    seed's ``(size, ptr)`` comparator and compares faster than a tuple.
    """

    __slots__ = ("_blocks", "_keys", "nbytes")

    def __init__(self) -> None:
        self._keys = SortedList()
        self._blocks: dict[int, Block] = {}
        #: bytes held by idle blocks
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, block: Block) -> None:
        self._keys.add((block.size << _PTR_BITS) | block.ptr)
        self._blocks[block.ptr] = block
        self.nbytes += block.size

    def take(self, size: int) -> Block | None:
        """Remove and return the smallest block that fits ``size``, or ``None``."""
        keys = self._keys
        i = keys.bisect_left(size << _PTR_BITS)
        if i == len(keys):
            return None
        block = self._blocks.pop(keys.pop(i) & _PTR_MASK)
        self.nbytes -= block.size
        return block

    def remove(self, block: Block) -> None:
        self._keys.remove((block.size << _PTR_BITS) | block.ptr)
        del self._blocks[block.ptr]
        self.nbytes -= block.size

    def take_all(self) -> list[Block]:
        blocks = list(self._blocks.values())
        self._keys.clear()
        self._blocks.clear()
        self.nbytes = 0
        return blocks

    def largest_first(self) -> Iterator[Block]:
        for key in reversed(self._keys):
            yield self._blocks[key & _PTR_MASK]
