"""Idle blocks ordered by ``(size, ptr)``: the seed's ``free_list_`` with its ``lower_bound``."""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, cast

from sortedcontainers import SortedKeyList, SortedList

from ._block import FREE
from ._sizes import Sizes
from ._sorted import merge

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

    A size's list that grows past ``BIG`` idle blocks (a tier of pages) becomes a
    ``SortedKeyList`` in the same order (``_Big``): inserting into a list moves its tail, so a
    300,000-page tier freed page by page took 18 s.  The old list is left holding a marker, so a
    block whose ``home`` it still is never takes the hit path's append to it.

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
        block.state = FREE  # (FREE means here)
        size = block.size
        same = self._list(size)
        if block.odd:
            self._count_odd(1)
        else:
            block.home = same
        if not same:
            same.append(block)
        elif type(same) is list:
            insort(same, block, key=_neg_ptr)
            if len(same) > BIG:
                self._grow(size)
        else:
            cast(_Big, same).add(block)
        self.nbytes += size

    def _grow(self, size: int) -> None:
        """``size``'s list, past ``BIG``: a sorted container from now on (see the class)."""
        old = self.lists[size]
        new = self.lists[size] = _Big(old)
        for block in new:
            if not block.odd:
                block.home = new
        for request, same in self._hits.items():
            if same is old:
                self._hits[request] = new
        old[:] = [cast("Block", _RETIRED)]  # (never empty again: the hit path appends elsewhere)

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

    def remove_many(self, blocks: list[Block]) -> None:
        """Remove ``blocks`` (all idle here): one pass over a size's list (a segment's blocks,
        thousands of one size), or, few against a sorted container, one removal each."""
        gone: dict[int, list[Block]] = {}
        for block in blocks:
            gone.setdefault(block.size, []).append(block)
        for size, group in gone.items():
            same = self.lists[size]
            if type(same) is not list and len(group) * 8 < len(same):
                for block in group:
                    same.remove(block)
            else:
                ids = {id(b) for b in group}
                kept = [b for b in same if id(b) not in ids]
                if type(same) is list:
                    same[:] = kept  # (in place: homes and hits hold it)
                else:
                    same.clear()
                    cast(_Big, same).update(kept)
            self.nbytes -= size * len(group)
        self._count_odd(-sum(b.odd for b in blocks))

    def add_many(self, blocks: list[Block]) -> None:
        """``add`` for many blocks: each size's list sorted once."""
        by_size: dict[int, list[Block]] = {}
        for block in blocks:
            block.state = FREE
            by_size.setdefault(block.size, []).append(block)
        for size, group in by_size.items():
            same = self._list(size)
            for block in group:
                if not block.odd:
                    block.home = same
            if type(same) is list:
                same.extend(group)
                same.sort(key=_neg_ptr)
                if len(same) > BIG:
                    self._grow(size)
            else:
                merge(same, group)
            self.nbytes += size * len(group)
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
#: idle blocks of one size past which its list becomes a ``_Big``
BIG = 1024
_RETIRED = object()  # what a list replaced by a _Big holds


class _Big(SortedKeyList):  # type: ignore[misc]
    """Many idle blocks of one size, lowest address last, with the list calls the free list and
    the hit paths make (``pop()`` takes the lowest address; ``append`` inserts in order)."""

    def __init__(self, blocks: Iterable[Block] = ()) -> None:
        super().__init__(blocks, key=_neg_ptr)

    def append(self, block: Block) -> None:
        self.add(block)


def _neg_ptr(block: Block) -> int:
    return -block.ptr
