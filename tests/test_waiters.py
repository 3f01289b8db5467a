"""ParkingLot: FIFO, grants handed over before waking, and nothing lost when a waiter leaves.

Modelled on CPython's test_locks.py and trio's test_sync.py: waiters are parked one at a time,
the loop is stepped until every task is blocked, and the outcome is compared as a list.
"""

from __future__ import annotations

import math

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from aiopinned._waiters import InFlight, ParkingLot

from .conftest import spin_until_past

pytestmark = pytest.mark.anyio


class Lot:
    """A ParkingLot of string grants, recording what leaving waiters passed on."""

    def __init__(self) -> None:
        self.passed_on: list[str | None] = []
        self.waits: list[float] = []
        self.lot: ParkingLot[str] = ParkingLot(self.passed_on.append, self.waits.append)
        self.got: dict[str, str | BaseException] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}

    async def park(self, tg: anyio.abc.TaskGroup, name: str, size: int = 1,
                   deadline: float = math.inf) -> None:  # fmt: skip
        scope = self.scopes[name] = anyio.CancelScope()

        async def run() -> None:
            with scope:
                try:
                    self.got[name] = await self.lot.park(size, deadline)
                except Exception as exc:
                    self.got[name] = exc

        tg.start_soon(run)
        await wait_all_tasks_blocked()


async def test_grants_go_to_waiters_in_arrival_order() -> None:
    t = Lot()
    async with anyio.create_task_group() as tg:
        for name, size in (("a", 3), ("b", 1), ("c", 2)):
            await t.park(tg, name, size)
        assert len(t.lot) == 3
        for grant in ("x", "y", "z"):
            t.lot.unpark(grant)
    assert t.got == {"a": "x", "b": "y", "c": "z"} and not t.lot
    assert len(t.waits) == 3 and all(us >= 0 for us in t.waits)


async def test_serve_hands_out_in_order_until_nothing_is_found() -> None:
    t, stock = Lot(), {1: ["one"], 2: ["two"], 5: []}
    async with anyio.create_task_group() as tg:
        for name, size in (("a", 1), ("b", 2), ("c", 5), ("d", 1)):
            await t.park(tg, name, size)
        t.lot.serve(lambda size: stock[size].pop() if stock[size] else None)
        assert len(t.lot) == 2  # "c" found nothing, so "d" behind it is not served either
        stock[5].append("five")
        stock[1].append("uno")
        t.lot.serve(lambda size: stock[size].pop() if stock[size] else None)
    assert t.got == {"a": "one", "b": "two", "c": "five", "d": "uno"}


async def test_a_waiter_owns_its_grant_before_it_runs() -> None:
    t = Lot()
    async with anyio.create_task_group() as tg:
        await t.park(tg, "a")
        t.lot.unpark("x")
        assert len(t.lot) == 0 and "a" not in t.got  # handed over, not yet running
    assert t.got == {"a": "x"}


async def test_a_waiter_cancelled_before_the_handoff_leaves_and_passes_on_nothing() -> None:
    t = Lot()
    async with anyio.create_task_group() as tg:
        await t.park(tg, "a")
        await t.park(tg, "b")
        t.scopes["a"].cancel()
        await wait_all_tasks_blocked()
        assert t.passed_on == [None] and len(t.lot) == 1
        t.lot.unpark("x")
    assert t.got == {"b": "x"}


@pytest.mark.usefixtures("asyncio_only")
async def test_a_waiter_cancelled_after_the_handoff_passes_its_grant_on() -> None:
    import asyncio

    t = Lot()
    task = asyncio.ensure_future(t.lot.park(1, math.inf))
    await wait_all_tasks_blocked()
    t.lot.unpark("x")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert t.passed_on == ["x"]


async def test_a_deadline_with_nothing_handed_over_raises_timeout_error() -> None:
    t = Lot()
    async with anyio.create_task_group() as tg:
        await t.park(tg, "a", deadline=anyio.current_time())  # already past: no real wait
    assert isinstance(t.got["a"], TimeoutError) and t.passed_on == [None] and not t.lot


async def test_a_deadline_that_races_the_handoff_keeps_the_grant() -> None:
    t = Lot()
    async with anyio.create_task_group() as tg:
        deadline = anyio.current_time() + 0.001
        await t.park(tg, "a", deadline=deadline)
        t.lot.unpark("x")
        spin_until_past(deadline)  # the deadline passes before "a" runs
    assert t.got == {"a": "x"} and t.passed_on == []


async def test_close_wakes_every_waiter_with_its_own_copy_of_the_error() -> None:
    t = Lot()
    async with anyio.create_task_group() as tg:
        await t.park(tg, "a")
        await t.park(tg, "b")
        t.lot.close(LookupError("closed"))
    errors = [t.got["a"], t.got["b"]]
    assert all(isinstance(e, LookupError) and str(e) == "closed" for e in errors)
    assert errors[0] is not errors[1] and t.passed_on == [] and not t.lot
    assert "waiters=0" in repr(t.lot)


async def test_in_flight_work_is_awaited_until_none_is_left() -> None:
    work, woken = InFlight(), []
    await work.wait_idle()  # nothing in flight: at once
    work.started()
    work.started()
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            await work.wait_idle()
            woken.append(work.count)

        tg.start_soon(waiter)
        await wait_all_tasks_blocked()
        work.finished()
        await wait_all_tasks_blocked()
        assert woken == []
        work.finished()
    assert woken == [0]
