"""Idle blocks ordered by ``(size, ptr)``: the seed's ``free_list_`` with its ``lower_bound``."""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from ._sizes import Sizes

if TYPE_CHECKING:
    from ._block import Block


class FreeList:
    """Best fit: ``take(n)`` pops the smallest idle block of at least ``n`` bytes.

    Order is the seed's ``(size, ptr)``: the smallest size that fits, and among blocks of that
    size the lowest address.  Blocks are grouped by size: ``lists`` holds each size's idle blocks,
    lowest address last, and ``_sizes`` (a ``SortedList``) the sizes that have a list.
    Blocks almost always have class sizes (``_sizes.Sizes``: what growth pins), and the class of
    ``n`` is then the best fit, so a hit is one dict lookup (``hit``: request size -> its class's
    list) and a ``list.pop`` before any sorted search.  Blocks of other sizes (pinned to the exact
    size at a ``max_bytes`` edge) are counted, and while any is idle ``hit`` is empty, so every
    lookup takes the sorted path.

    A class size's list, once made, stays for the pool's life (at most four per doubling of
    size), so ``hit`` and each block's ``home`` (its size's list, once it has been idle) stay
    good; the list of an odd size is dropped once it runs empty.  The pool's hit paths
    (``allocate``, ``allocate_nowait``, and a buffer coming back) read ``hit``, append to an
    empty ``home`` and keep ``nbytes`` themselves, and call ``take``/``add`` for everything else:
    a change to these must be made there too.

    ``sizes.limit(n)`` bounds the block a request may take (``None``: any): otherwise a small
    request could sit in a big idle block while the cap keeps the next big request waiting
    forever (the best-fit trap); a block that is too big is left idle, where growth may unpin it.
    """

    __slots__ = ("_hits", "_sizes", "hit", "lists", "nbytes", "odd", "sizes")

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        self._sizes = SortedList()
        #: size -> idle blocks of that size, sorted by descending address (pop() is the lowest)
        self.lists: dict[int, list[Block]] = {}
        #: request size -> ``lists[its class]``, for the sizes ``take`` has seen
        self._hits: dict[int, list[Block]] = {}
        #: the hit paths' lookup: ``_hits`` while no odd block is idle, else empty
        self.hit: Mapping[int, list[Block]] = self._hits
        #: idle blocks whose size is not a class size
        self.odd = 0
        #: the bytes the idle blocks hold
        self.nbytes = 0

    def __len__(self) -> int:
        """The idle blocks (counted, for stats: the hot paths keep no count).  ``list()`` copies
        the lists in one step, so a stats scrape from another thread reads a consistent set."""
        return sum(map(len, list(self.lists.values())))

    def __bool__(self) -> bool:
        return self.nbytes > 0  # (every block has a size)

    def add(self, block: Block) -> None:
        size = block.size
        same = self._list(size)
        if block.odd:
            self._count_odd(1)
        else:
            block.home = same
        if same:
            insort(same, block, key=_neg_ptr)
        else:
            same.append(block)
        self.nbytes += size

    def take(self, size: int) -> Block | None:
        """Remove and return the smallest block that fits ``size`` (within the limit), or None."""
        same = self._list(self.sizes.grow(size))
        if len(self._hits) < 1 << 16:  # (past that, the lookup misses and comes here: still right)
            self._hits[size] = same
        if same and not self.odd:  # (no odd block is idle: the class is the best fit)
            block = same.pop()
            self.nbytes -= block.size
            return block
        sizes, by_size, limit = self._sizes, self.lists, self.sizes.limit(size)
        i = sizes.bisect_left(size)
        while i < len(sizes):
            if limit is not None and sizes[i] > limit:
                return None
            same = by_size[sizes[i]]
            if same:
                return self._pop(same)
            if self._is_odd(sizes[i]):
                del by_size[sizes.pop(i)]  # an odd size's empty list: dropped as we pass
            else:
                i += 1
        return None

    def _list(self, size: int) -> list[Block]:
        """The list of ``size``'s idle blocks, made if it has none."""
        same = self.lists.get(size)
        if same is None:
            same = self.lists[size] = []
            self._sizes.add(size)
        return same

    def _is_odd(self, size: int) -> bool:
        return self.sizes.grow(size) != size

    def _count_odd(self, change: int) -> None:
        self.odd += change
        self.hit = _NO_HITS if self.odd else self._hits

    def _pop(self, same: list[Block]) -> Block:
        block = same.pop()
        if block.odd:
            self._count_odd(-1)
        self.nbytes -= block.size
        return block

    def remove(self, block: Block) -> None:
        same = self.lists[block.size]
        same.remove(block)
        same.append(block)  # now last: _pop takes exactly this one
        self._pop(same)

    def remove_many(self, blocks: list[Block]) -> None:
        """Remove ``blocks`` (all idle here): one pass over each size's list, not one per block
        (a segment's blocks, thousands of one size)."""
        gone: dict[int, set[int]] = {}
        for block in blocks:
            gone.setdefault(block.size, set()).add(id(block))
        for size, ids in gone.items():
            same = self.lists[size]
            same[:] = [b for b in same if id(b) not in ids]  # (in place: homes and hits hold it)
            self.nbytes -= size * len(ids)
        self._count_odd(-sum(b.odd for b in blocks))

    def add_many(self, blocks: list[Block]) -> None:
        """``add`` for many blocks: each size's list sorted once."""
        touched = set()
        for block in blocks:
            same = self._list(block.size)
            if not block.odd:
                block.home = same
            same.append(block)
            touched.add(block.size)
            self.nbytes += block.size
        for size in touched:
            self.lists[size].sort(key=_neg_ptr)
        self._count_odd(sum(b.odd for b in blocks))

    def take_all(self) -> list[Block]:
        blocks = [b for same in self.lists.values() for b in same]
        for size in list(self.lists):
            if self._is_odd(size):
                del self.lists[size]
                self._sizes.remove(size)
            else:
                self.lists[size].clear()  # (kept: the hit map and the blocks' homes hold it)
        self.nbytes = 0
        self._count_odd(-self.odd)
        return blocks

    def blocks(self) -> list[Block]:
        """Every idle block (a copy: the caller may remove them)."""
        return [b for same in self.lists.values() for b in same]

    def largest_first(self) -> Iterator[Block]:
        for size in reversed(self._sizes):
            yield from reversed(self.lists[size])  # (empty sizes yield nothing)


_NO_HITS: Mapping[int, list[Block]] = MappingProxyType({})


def _neg_ptr(block: Block) -> int:
    return -block.ptr
