"""Registry: blocks by address, and which block holds an address anywhere inside it."""

from __future__ import annotations

import threading

import pytest

from aiopinned._block import Block
from aiopinned._registry import Registry


def test_find_answers_for_any_address_inside_a_block_and_none_outside() -> None:
    reg = Registry()
    a, b = Block(0x1000, 0x100), Block(0x2000, 0x10)
    reg.add(a)
    reg.add(b)
    assert [reg.find(p) for p in (0x1000, 0x10FF, 0x2000, 0x200F)] == [a, a, b, b]
    assert [reg.find(p) for p in (0xFFF, 0x1100, 0x2010, 0)] == [None] * 4
    assert len(reg) == 2 and a in reg


def test_removed_blocks_are_not_found() -> None:
    reg = Registry()
    a = Block(0x1000, 0x100)
    reg.add(a)
    reg.remove(a)
    assert reg.find(0x1000) is None and a not in reg and len(reg) == 0
    with pytest.raises(KeyError):
        reg.remove(a)


def test_a_block_at_a_registered_address_is_refused() -> None:
    reg = Registry()
    reg.add(Block(0x1000, 0x100))
    with pytest.raises(ValueError, match="overlaps"):
        reg.add(Block(0x1000, 0x10))


def test_lookups_from_other_threads_see_consistent_blocks() -> None:
    reg, stop, bad = Registry(), threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            block = reg.find(0x1000 + 5)
            if block is not None and not block.ptr <= 0x1005 < block.ptr + block.size:
                bad.append(block)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(5000):
        block = Block(0x1000, 16 + i % 7)
        reg.add(block)
        reg.remove(block)
    stop.set()
    for t in threads:
        t.join()
    assert bad == []
