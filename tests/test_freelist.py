"""FreeList and the size rules: the seed's best fit on ``(size, ptr)``, the exact-class fast path,
the bound on how big a block a request may take, and the fine size classes."""

from __future__ import annotations

import random

import pytest

from aiopinned._block import Block, pow2
from aiopinned._freelist import FreeList
from aiopinned._sizes import Sizes, fine


def blocks(*sizes: int, base: int = 0x10000) -> list[Block]:
    """Blocks of ``sizes``, marked odd where they are not powers of two (as the cache marks
    blocks that are not size classes)."""
    return [Block(base + i * 0x100000, size, pow2(size) != size) for i, size in enumerate(sizes)]


def test_take_is_the_smallest_block_that_fits_lowest_address_first() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    a, b, c, d = blocks(4096, 1024, 2048, 1024)
    for block in (a, b, c, d):
        free.add(block)
    assert free.take(1500) is c
    assert free.take(1) is b  # two 1024s: the lower address first
    assert free.take(1000) is d
    assert free.take(4097) is None  # never a block smaller than the request
    assert free.take(4096) is a
    assert (len(free), free.nbytes) == (0, 0)


def test_count_and_bytes_follow_adds_and_takes() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    for block in blocks(64, 128, 128):
        free.add(block)
    assert (len(free), free.nbytes) == (3, 320)
    free.take(100)
    assert (len(free), free.nbytes) == (2, 192)


def test_blocks_of_odd_sizes_are_found_by_the_sorted_search() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    odd, pow2_block = blocks(3000, 4096)
    free.add(pow2_block)
    free.add(odd)
    assert free.take(2500) is odd  # the best fit, though 4096 is the size class of 2500
    assert free.take(2500) is pow2_block


def test_bounded_takes_no_block_beyond_the_requests_size_class() -> None:
    free = FreeList(Sizes("pow2", capped=True))
    (big,) = blocks(1 << 20)
    free.add(big)
    assert free.take(1000) is None  # the cap's rule: it would sit in a 1 MiB block
    assert free.take((1 << 19) + 1) is big  # pow2 of it is 1 MiB


def test_remove_takes_exactly_that_block() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    a, b, c = blocks(1024, 1024, 1024)
    for block in (a, b, c):
        free.add(block)
    free.remove_many([b])
    assert [free.take(1024), free.take(1024), free.take(1024)] == [a, c, None]


def test_take_all_empties_and_largest_first_orders_by_size() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    for block in blocks(64, 4096, 512, 4096):
        free.add(block)
    assert [b.size for b in free.largest_first()] == [4096, 4096, 512, 64]
    assert sorted(b.size for b in free.take_all()) == [64, 512, 4096, 4096]
    assert (len(free), free.nbytes, list(free.largest_first())) == (0, 0, [])


@pytest.mark.parametrize("seed", range(5))
def test_random_adds_and_takes_match_a_sorted_model(seed: int) -> None:
    rng = random.Random(seed)
    free, model = FreeList(Sizes("pow2", capped=False)), []  # model: (size, ptr) kept sorted
    ptr = 0x1000
    for _ in range(2000):
        if rng.random() < 0.5:
            size = rng.choice([pow2(rng.randrange(1, 1 << 16)), rng.randrange(1, 1 << 16)])
            ptr += 1 << 17
            free.add(Block(ptr, size, pow2(size) != size))
            model.append((size, ptr))
            model.sort()
        else:
            want = rng.randrange(1, 1 << 16)
            got = free.take(want)
            fit = next(((s, p) for s, p in model if s >= want), None)
            assert (None if got is None else (got.size, got.ptr)) == fit
            if fit is not None:
                model.remove(fit)
        assert (len(free), free.nbytes) == (len(model), sum(s for s, _ in model))


def hit_or_take(free: FreeList, n: int) -> Block | None:
    """The pool's ``allocate_nowait``: the ``hit`` lookup and pop, else ``take``."""
    same = free.hit.get(n)
    if same:
        block = same.pop()
        free.nbytes -= block.size
        return block
    return free.take(n)


def home_or_add(free: FreeList, block: Block) -> None:
    """``PinnedBuffer.free``: into an empty ``home`` itself, else ``add``."""
    same = block.home
    if same is not None and not same:
        same.append(block)
        free.nbytes += block.size
    else:
        free.add(block)


@pytest.mark.parametrize(("seed", "rounding"), [(s, r) for s in range(4) for r in ("pow2", "fine")])
def test_the_hit_paths_match_a_sorted_model(seed: int, rounding: str) -> None:
    """New blocks (odd ones too), takes and returns in random order, through the pool's inline
    paths half the time: every take is still the seed's best fit within the limit."""
    rng = random.Random(seed)
    sizes = Sizes(rounding, capped=False)
    free, model, out = FreeList(sizes), [], []  # model: idle (size, ptr), sorted; out: taken
    ptr = 0x1000
    for _ in range(3000):
        roll = rng.random()
        if roll < 0.2:
            n = rng.randrange(1, 1 << 17)
            size = sizes.grow(n) if rng.random() < 0.8 else n
            ptr += 1 << 18
            block = Block(ptr, size, sizes.grow(size) != size)
            free.add(block)
            model.append((size, ptr))
        elif roll < 0.6 and out:
            block = out.pop(rng.randrange(len(out)))
            (home_or_add if rng.random() < 0.5 else FreeList.add)(free, block)
            model.append((block.size, block.ptr))
        else:
            want = (
                rng.choice([b for b, _ in model] or [1])
                if rng.random() < 0.7
                else rng.randrange(1, 1 << 17)
            )
            got = (hit_or_take if rng.random() < 0.5 else FreeList.take)(free, want)
            limit = sizes.limit(want)
            fit = next(((s, p) for s, p in sorted(model) if s >= want), None)
            if fit is not None and limit is not None and fit[0] > limit:
                fit = None
            assert (None if got is None else (got.size, got.ptr)) == fit
            if got is not None:
                model.remove(fit)
                out.append(got)
        model.sort()
        assert (len(free), free.nbytes) == (len(model), sum(s for s, _ in model))


def test_hit_is_off_while_an_odd_block_is_idle_and_homes_outlive_take_all() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    klass, odd = blocks(4096, 3000)
    free.add(klass)
    assert free.take(4000) is klass and free.hit.get(4000) == []  # seen: the class's list
    free.add(odd)
    assert free.hit.get(4000) is None  # an odd block is idle: every lookup is sorted
    home_or_add(free, klass)
    assert hit_or_take(free, 2900) is odd  # the best fit, not the class of 2900
    assert free.hit.get(4000) == [klass]  # no odd block idle: the lookup is back
    free.add(odd)
    assert sorted(b.size for b in free.take_all()) == [3000, 4096]
    assert 3000 not in free.lists and free.lists[4096] == [] and klass.home is free.lists[4096]


def test_fine_classes_are_four_per_doubling_above_16_kib() -> None:
    assert [fine(n) for n in (1, 3000, 16 << 10)] == [1, 4096, 16 << 10]
    kib = 1 << 10
    assert [fine(n) // kib for n in (16 * kib + 1, 20 * kib, 20 * kib + 1, 31 * kib, 32 * kib)] == [
        20, 20, 24, 32, 32]  # fmt: skip
    assert all(n <= fine(n) <= 1.25 * n for n in range(16 * kib, 1 << 22, 4093))


def test_fine_takes_no_block_more_than_one_class_above_even_without_a_cap() -> None:
    free = FreeList(Sizes("fine", capped=False))
    kib = 1 << 10
    b40, b48, b56 = blocks(40 * kib, 48 * kib, 56 * kib)
    for block in (b56, b48, b40):
        free.add(block)
    assert free.take(33 * kib) is b40  # its class
    assert free.take(33 * kib) is b48  # one class above
    assert free.take(33 * kib) is None  # 56 KiB is two classes above: left for bigger requests
    assert free.take(50 * kib) is b56


def test_pow2_without_a_cap_is_the_seeds_unbounded_best_fit() -> None:
    free = FreeList(Sizes("pow2", capped=False))
    (big,) = blocks(1 << 20)
    free.add(big)
    assert free.take(1000) is big


def test_a_size_with_many_idle_blocks_keeps_address_order_in_a_sorted_container() -> None:
    from aiopinned._freelist import BIG

    free = FreeList(Sizes("fine", capped=False))
    many = [Block(0x10000 + i * 4096, 4096) for i in range(BIG + 300)]
    random.Random(3).shuffle(many)
    old_home = None
    for block in many:
        free.add(block)
        old_home = old_home or block.home
    assert type(free.lists[4096]) is not list and free.nbytes == len(many) * 4096
    assert old_home is not free.lists[4096] and old_home  # the old list: never empty again
    assert all(b.home is free.lists[4096] for b in many)
    got = [free.take(4096) for _ in range(len(many))]
    assert [b.ptr for b in got if b] == sorted(b.ptr for b in many)  # lowest address first
    assert free.take(4096) is None and free.nbytes == 0
    free.add_many(got[:500])
    free.remove_many(got[:10])
    free.remove_many([got[10]])
    assert len(free) == 489 and free.take(4096) is got[11]
