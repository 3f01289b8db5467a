"""Cache: the registry, the free list and the reservations kept consistent with each other."""

from __future__ import annotations

from aiopinned._block import ALLOCATED, PENDING, UNPINNED, Block
from aiopinned._cache import Cache

KB = 1024


def cached(cache: Cache, ptr: int, size: int) -> Block:
    """A block as a settled growth leaves it, then returned to the free list."""
    plan = cache.plan(size)
    assert plan is not None
    (block,) = cache.settle_pinned(plan, ptr)
    cache.free.add(block)
    return block


def test_settled_growth_is_registered_and_reserved() -> None:
    cache = Cache(None)
    plan = cache.plan(3000)
    assert plan is not None
    (block,) = cache.settle_pinned(plan, 0x10000)
    assert (block.size, block.state, block in cache.registry) == (4096, PENDING, True)
    assert cache.gauges() == {"reserved_bytes": 4096, "peak_reserved_bytes": 4096,
                              "free_blocks": 0, "free_bytes": 0, "cached_bytes": 0,
                              "trimmed_bytes": 0, "active_bytes": 0,
                              "active_requests": 0, "segments": 0,
                              "stranded_bytes": 0}  # fmt: skip
    block.state = ALLOCATED  # (as a hand-out leaves it)
    assert (cache.gauges()["active_bytes"], cache.gauges()["active_requests"]) == (4096, 1)


def test_victims_leave_the_free_list_and_the_registry_at_once() -> None:
    cache = Cache(64 * KB)
    small = [cached(cache, (i + 1) << 20, 16 * KB) for i in range(4)]
    plan = cache.plan(64 * KB)
    assert plan is not None and sorted(plan.victims, key=id) == sorted(small, key=id)
    assert all(b.state == UNPINNED and b not in cache.registry for b in small)
    assert len(cache.free) == 0
    cache.settle_failed(plan)
    assert cache.reservations.reserved == 0


def test_undo_registers_the_victims_again() -> None:
    cache = Cache(32 * KB)
    block = cached(cache, 1 << 20, 32 * KB)
    plan = cache.plan(32 * KB + 1)  # pow2 does not fit: exactly the request, after the victim
    assert plan is None  # more than the cap
    plan = cache.plan(20 * KB)
    assert plan is not None and plan.victims == [block]
    back = cache.undo(plan)
    assert back == [block] and block in cache.registry and block.state == PENDING
    assert cache.reservations.reserved == 32 * KB


def test_take_idle_unregisters_but_keeps_the_bytes_reserved() -> None:
    cache = Cache(None)
    blocks = [cached(cache, (i + 1) << 20, 1024) for i in range(3)]
    taken = cache.take_idle()
    assert sorted(taken, key=id) == sorted(blocks, key=id)
    assert len(cache.registry) == 0 and cache.reservations.reserved == 3 * 1024


def test_find_live_answers_only_for_handed_out_blocks() -> None:
    cache = Cache(None)
    block = cached(cache, 1 << 20, 4096)
    assert cache.find_live(block.ptr + 10) is None  # idle
    block.state = ALLOCATED
    assert cache.find_live(block.ptr + 10) is block
    assert cache.find_live(block.ptr + 4096) is None


def test_the_out_of_memory_retry_plans_after_unpinning_every_idle_block() -> None:
    cache = Cache(None)
    cached(cache, 1 << 20, 1024)
    plan = cache.plan_after_unpinning_all(8 * KB)
    assert [b.size for b in plan.victims] == [1024] and len(cache.free) == 0
    cache.settle_pinned(plan, 2 << 20)
    assert cache.reservations.reserved == 8 * KB
