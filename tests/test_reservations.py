"""Reservations: the cap, plans with plan / settle / undo, and the bound they keep (no loop)."""

from __future__ import annotations

from aiopinned._block import Block
from aiopinned._reservations import Plan, Reservations

KB = 1024


def test_without_a_cap_growth_rounds_to_a_power_of_two_and_takes_no_victims() -> None:
    r = Reservations(None)
    plan = r.plan(3000, 0, [])
    assert plan is not None
    assert (plan.size, plan.victims, r.reserved) == (4096, [], 4096)
    r.settle(plan, pinned=True)
    assert (r.reserved, r.peak) == (4096, 4096)


def test_under_a_cap_growth_pins_exactly_the_request_where_pow2_does_not_fit() -> None:
    r = Reservations(96 * KB)
    plan = r.plan(70 * KB, 0, [])
    assert plan is not None and plan.size == 70 * KB


def test_a_plan_that_cannot_fit_even_with_every_idle_block_is_refused() -> None:
    r = Reservations(64 * KB)
    r.reserved = 60 * KB
    idle = [Block(0x1000, 2 * KB)]
    assert r.plan(8 * KB, 2 * KB, idle) is None
    assert r.reserved == 60 * KB  # nothing was charged


def test_victims_are_taken_largest_first_until_there_is_room() -> None:
    r = Reservations(64 * KB)
    r.reserved = 64 * KB  # everything pinned; idle: 32, 16, 8, 8 KiB
    idle = [Block(i << 20, s * KB) for i, s in enumerate((32, 16, 8, 8))]
    plan = r.plan(40 * KB, 64 * KB, idle)
    assert plan is not None
    assert [b.size for b in plan.victims] == [32 * KB, 16 * KB]
    assert (plan.size, plan.freed, plan.charge) == (40 * KB, 48 * KB, 0)


def test_victims_stay_reserved_until_the_thread_has_unpinned_them() -> None:
    r = Reservations(64 * KB)
    r.reserved = 64 * KB
    idle = [Block(1 << 20, 64 * KB)]
    plan = r.plan(32 * KB, 64 * KB, idle)
    assert plan is not None
    assert r.reserved == 64 * KB  # the victim still occupies its bytes
    assert r.plan(32 * KB, 0, []) is None  # so nobody can pin into its room yet
    r.settle(plan, pinned=True)
    assert r.reserved == 32 * KB


def test_a_failed_pin_gives_back_its_charge_and_its_victims_bytes() -> None:
    r = Reservations(64 * KB)
    r.reserved = 16 * KB
    plan = r.plan(64 * KB, 16 * KB, [Block(1 << 20, 16 * KB)])
    assert plan is not None and r.reserved == 64 * KB
    r.settle(plan, pinned=False)
    assert r.reserved == 0 and r.peak == 64 * KB


def test_an_undone_plan_gives_back_only_its_charge() -> None:
    r = Reservations(64 * KB)
    r.reserved = 32 * KB
    plan = r.plan(32 * KB, 0, [])
    assert plan is not None and r.reserved == 64 * KB
    r.undo(plan)
    assert r.reserved == 32 * KB


def test_grant_and_unpinned_move_reserved() -> None:
    r = Reservations(None)
    r.grant(Plan(8 * KB, []))
    r.unpinned(8 * KB)
    assert (r.reserved, r.peak) == (0, 8 * KB)
