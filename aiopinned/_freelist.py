"""Idle blocks ordered by ``(size, ptr)``: the seed's ``free_list_`` with its ``lower_bound``."""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterator
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from ._sizes import Sizes

if TYPE_CHECKING:
    from ._block import Block


class FreeList:
    """Best fit: ``take(n)`` pops the smallest idle block of at least ``n`` bytes.

    Order is the seed's ``(size, ptr)``: the smallest size that fits, and among blocks of that
    size the lowest address.  Blocks are grouped by size: ``_sizes`` (a ``SortedList``) holds the
    sizes that have had idle blocks and ``lists`` each size's blocks, lowest address last (a
    size whose list runs empty stays, so that a block cycling through the cache costs no sorted
    insert or remove; the sorted path drops empty sizes it walks past).  Blocks almost always
    have class sizes (``_sizes.Sizes``: what growth pins), and the class of ``n`` is then the
    best fit, so a hit is two dict lookups and a ``list.pop`` before any sorted search.  Blocks
    of other sizes (pinned to the exact size at a ``max_bytes`` edge) are counted, and while any
    is idle every lookup takes the sorted path.

    The pool's hit paths (``allocate_nowait``, and a buffer coming back) inline the first branch
    of ``take`` and of ``add`` over ``lists``, ``memo``, ``odd`` and ``nbytes``, and call them
    for everything else: a change to these four must be made there too.

    ``sizes.limit(n)`` bounds the block a request may take (``None``: any): otherwise a small
    request could sit in a big idle block while the cap keeps the next big request waiting
    forever (the best-fit trap); a block that is too big is left idle, where growth may unpin it.
    """

    __slots__ = ("_sizes", "lists", "memo", "nbytes", "odd", "sizes")

    def __init__(self, sizes: Sizes) -> None:
        self.sizes = sizes
        #: request size -> its class: the hot path's lookup, no call
        self.memo = sizes.memo
        self._sizes = SortedList()
        #: size -> idle blocks of that size, sorted by descending address (pop() is the lowest)
        self.lists: dict[int, list[Block]] = {}
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
        same = self.lists.get(size)
        if same is None:
            self.lists[size] = [block]
            self._sizes.add(size)
        elif not same:
            same.append(block)
        else:
            insort(same, block, key=_neg_ptr)
        if block.odd:
            self.odd += 1
        self.nbytes += size

    def take(self, size: int) -> Block | None:
        """Remove and return the smallest block that fits ``size`` (within the limit), or None."""
        if not self.odd:  # (the hit: no odd block is idle, so this pop needs no odd check)
            same = self.lists.get(self.memo.get(size) or self.sizes.size_class(size))
            if same:
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
            del by_size[sizes.pop(i)]  # an empty size: drop it as we pass
        return None

    def _pop(self, same: list[Block]) -> Block:
        block = same.pop()
        size = block.size
        if block.odd:
            self.odd -= 1
        self.nbytes -= size
        return block

    def remove(self, block: Block) -> None:
        same = self.lists[block.size]
        same.remove(block)
        same.append(block)  # now last: _pop takes exactly this one
        self._pop(same)

    def take_all(self) -> list[Block]:
        blocks = [b for same in self.lists.values() for b in same]
        self._sizes.clear()
        self.lists.clear()
        self.odd = self.nbytes = 0
        return blocks

    def blocks(self) -> list[Block]:
        """Every idle block (a copy: the caller may remove them)."""
        return [b for same in self.lists.values() for b in same]

    def largest_first(self) -> Iterator[Block]:
        for size in reversed(self._sizes):
            yield from reversed(self.lists[size])  # (empty sizes yield nothing)


def _neg_ptr(block: Block) -> int:
    return -block.ptr
