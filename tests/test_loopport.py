"""LoopPort (into the loop from any thread) and run_off_loop (blocking calls that never lose
their outcome)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from aiopinned import _loopport
from aiopinned._loopport import LoopGone, LoopPort, run_detached, run_off_loop

from .conftest import settle, until

pytestmark = pytest.mark.anyio


async def test_post_runs_the_call_on_the_loop_thread() -> None:
    port, ran = LoopPort(), []
    assert port.is_current() and port.thread_id == threading.get_ident()

    def from_thread() -> bool:
        return port.post(lambda: ran.append(threading.get_ident()))

    assert await anyio.to_thread.run_sync(from_thread)
    await until(lambda: bool(ran))
    assert ran == [threading.get_ident()]


def test_post_answers_false_once_the_loop_is_gone() -> None:
    ports: list[LoopPort] = []

    async def grab() -> None:
        ports.append(LoopPort())

    anyio.run(grab)
    assert ports[0].post(lambda: None) is False


async def test_is_current_is_false_on_another_loop() -> None:
    port = LoopPort()

    def other() -> bool:
        async def check() -> bool:
            return port.is_current()

        return anyio.run(check)

    assert await anyio.to_thread.run_sync(other) is False


async def test_run_off_loop_returns_the_result_from_another_thread() -> None:
    loop_thread = threading.get_ident()
    result = await run_off_loop(LoopPort(), threading.get_ident, on_orphan=_never)
    assert result != loop_thread


async def test_run_off_loop_raises_what_the_call_raised() -> None:
    with pytest.raises(ZeroDivisionError):
        await run_off_loop(LoopPort(), lambda: 1 // 0, on_orphan=_never)


async def test_a_caller_that_leaves_hands_the_outcome_to_on_orphan_once() -> None:
    gate, orphaned = threading.Event(), []
    port = LoopPort()

    def work() -> str:
        gate.wait(30)
        return "pinned"

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: run_off_loop(port, work, on_orphan=lambda *o: orphaned.append(o)))
        await wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert orphaned == []  # the call still runs: nothing to adopt yet
    gate.set()
    await until(lambda: bool(orphaned))
    assert orphaned == [("pinned", None)]


async def test_a_caller_cancelled_after_the_call_finished_still_hands_it_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[threading.Thread] = []

    def start_joinable(fn: Callable[[], object]) -> None:  # (so that the test can join it)
        started.append(threading.Thread(target=fn))
        started[-1].start()

    monkeypatch.setattr(_loopport, "start_thread", start_joinable)
    orphaned: list[tuple[Any, BaseException | None]] = []
    returned: list[int] = []
    port = LoopPort()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                on_orphan = lambda *o: orphaned.append(o)  # noqa: E731
                returned.append(await run_off_loop(port, lambda: 7, on_orphan=on_orphan))

            tg.start_soon(call)
            await wait_all_tasks_blocked()
            for thread in started:  # the call is over and its wake-up posted,
                thread.join()  # but the loop has not run it yet
            scope.cancel()
    # Exactly once: asyncio cancels the waiting caller, so the pool adopts the outcome; trio
    # may have rescheduled the caller with its result first, and a rescheduled task keeps it.
    assert returned + [result for result, _ in orphaned] == [7]


async def test_a_thread_is_started_without_waiting_for_it_to_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def waits(self: threading.Thread) -> None:  # (waits for the new thread to take the GIL)
        raise AssertionError("threading.Thread.start() on the loop")

    monkeypatch.setattr(threading.Thread, "start", waits)
    assert await run_off_loop(LoopPort(), lambda: 7, on_orphan=lambda *o: None) == 7


async def test_run_detached_runs_in_the_reaper_thread_even_from_a_finalizer() -> None:
    ran: list[str] = []
    done = threading.Event()

    class Dropped:
        def __del__(self) -> None:
            run_detached(lambda: (ran.append(threading.current_thread().name), done.set()))

    Dropped()  # its finalizer hands work over: a queue put, no thread started there
    assert await anyio.to_thread.run_sync(done.wait, 30)
    assert ran == ["aiopinned-reaper"]


async def test_call_from_a_thread_returns_what_the_loop_computed() -> None:
    port = LoopPort()

    async def compute() -> int:
        await anyio.lowlevel.checkpoint()
        return threading.get_ident()

    def in_thread() -> int:
        return port.call(compute, timeout=30, on_orphan=_never)

    assert await anyio.to_thread.run_sync(in_thread) == threading.get_ident()


async def test_call_keeps_its_timeout_while_the_loop_is_not_running() -> None:
    """The loop thread is held: the caller still gives up on time, and the call it asked for
    never runs once the loop does."""
    port, orphans, gave_up = LoopPort(), [], threading.Event()

    def caller() -> None:
        try:
            port.call(lambda: _value(7), timeout=0.01, on_orphan=orphans.append)
        except TimeoutError:
            gave_up.set()

    thread = threading.Thread(target=caller)
    thread.start()
    assert gave_up.wait(30)  # the loop thread is held right here, running nothing
    thread.join()
    await settle()  # the loop runs again: the call it was asked for was cancelled unstarted
    assert orphans == []


async def test_call_raises_loop_gone_once_the_loop_has_stopped() -> None:
    ports: list[LoopPort] = []

    async def grab() -> None:
        ports.append(LoopPort())

    await anyio.to_thread.run_sync(lambda: anyio.run(grab))
    with pytest.raises(LoopGone):
        ports[0].call(lambda: _value(1), timeout=1, on_orphan=_never)


async def _value(value: int) -> int:
    return value


def _never(result: object, error: BaseException | None) -> None:
    raise AssertionError("no orphan expected")
