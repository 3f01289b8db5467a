"""Many items into a ``sortedcontainers`` list at once: a segment's blocks, into a large tier's
free list and registry.

``update`` sorts everything again (each segment settled into a tier took longer than the last),
and one ``add`` each costs a bisection and a list insert per item: about 2.5 µs, most of the
loop's time to settle a segment of 512 blocks.  A segment is one new mapping, so its blocks are
a run of addresses with nothing the list holds between them: ``merge`` puts such a run in with
one slice assignment, the way ``add`` puts one item in, and splits the sublist it grew as
``add`` would.  This reads the lists' layout (``_lists``, ``_keys``, ``_maxes``, ``_index``,
``_len``, ``_load``: sortedcontainers 2.x, unchanged since 2.0); ``tests/test_sorted.py`` checks
the result with the library's own ``_check``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection
from itertools import pairwise
from typing import Any

from sortedcontainers import SortedList


def merge(into: SortedList, items: Collection[Any]) -> None:
    """``into.update(items)``: one splice where ``items`` are a run with nothing of ``into``
    inside it, few against what ``into`` holds; else ``update`` (many), or one ``add`` each."""
    if len(items) * 8 >= len(into):
        into.update(items)
        return
    run = sorted(items, key=into.key)
    if not _splice(into, run):
        for item in run:
            into.add(item)


def _splice(into: Any, run: list[Any]) -> bool:
    """``run`` (sorted) into ``into`` in one slice, if no key of ``into`` lies within its keys'
    span (else nothing, and ``False``)."""
    key = into.key
    keys = run if key is None else [key(item) for item in run]
    lists, maxes = into._lists, into._maxes
    klists = lists if key is None else into._keys
    if not maxes or not run:
        return False
    first, last = keys[0], keys[-1]
    pos = bisect_right(maxes, first)
    if pos and maxes[pos - 1] == first:
        return False  # (an equal key: ``add``'s order among equals is left to ``add``)
    if pos == len(maxes):
        pos -= 1
        at = len(klists[pos])
    else:
        at = bisect_right(klists[pos], first)
        if klists[pos][at] <= last or (at and klists[pos][at - 1] == first):
            return False
    lists[pos][at:at] = run
    if key is not None:
        klists[pos][at:at] = keys
    into._len += len(run)
    grown, load = len(lists[pos]), into._load
    if grown > 2 * load:  # split as ``add`` would: pieces between load and twice it
        pieces = grown // load
        cuts = [grown * i // pieces for i in range(pieces + 1)]
        for held in (lists,) if key is None else (lists, klists):
            whole = held[pos]
            held[pos : pos + 1] = [whole[a:b] for a, b in pairwise(cuts)]
        maxes[pos : pos + 1] = [k[-1] for k in klists[pos : pos + pieces]]
    else:
        maxes[pos] = klists[pos][-1]
    del into._index[:]
    return True
