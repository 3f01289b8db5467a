"""EventWatcher: pending events per stream, completion seen from helper threads or polls."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

from aiopinned import HostStream, _events
from aiopinned._events import EventWatcher
from aiopinned._loopport import LoopPort
from aiopinned.backends.host import HostBackend

from .conftest import Gate, until

pytestmark = pytest.mark.anyio


def watcher(idle_s: float = 5.0, poll_s: float = 1e-4) -> tuple[EventWatcher, HostBackend]:
    backend = HostBackend()
    return EventWatcher(backend, LoopPort(), idle_s=idle_s, poll_s=poll_s), backend


async def test_the_helper_thread_reports_completion_on_the_loop() -> None:
    w, backend = watcher()
    stream, gate, done = HostStream(), Gate(), []
    stream.launch(gate)
    w.add(stream, backend.record(stream), lambda: done.append(threading.get_ident()))
    assert len(w) == 1 and w.poll() == 0
    gate.open()
    await until(lambda: bool(done))
    assert done == [threading.get_ident()] and len(w) == 0
    w.stop()


async def test_poll_completes_finished_events_in_order() -> None:
    w, backend = watcher()
    stream, gate, done = HostStream(), Gate(), []
    stream.launch(gate)
    for i in range(3):
        w.add(stream, backend.record(stream), lambda i=i: done.append(i))
    gate.open()
    stream.synchronize()  # blocking: the helper's report cannot land before the poll
    assert w.poll() == 3 and done == [0, 1, 2]
    w.stop()


async def test_a_stuck_stream_holds_back_only_its_own_events() -> None:
    w, backend = watcher()
    (stuck, gate), fine, done = (HostStream(), Gate()), HostStream(), []
    stuck.launch(gate)
    w.add(stuck, backend.record(stuck), lambda: done.append("stuck"))
    w.add(fine, backend.record(fine), lambda: done.append("fine"))
    await until(lambda: done == ["fine"])
    assert w.poll() == 0 and len(w) == 1
    gate.open()
    await until(lambda: done == ["fine", "stuck"])
    w.stop()


async def test_after_calls_back_once_every_stream_is_done() -> None:
    w, _ = watcher()
    (a, gate_a), (b, gate_b), done = (HostStream(), Gate()), (HostStream(), Gate()), []
    a.launch(gate_a)
    b.launch(gate_b)
    w.after({a, b}, lambda: done.append("both"))
    assert len(w) == 2
    gate_a.open()
    a.synchronize()
    w.poll()
    assert done == [] and len(w) == 1
    gate_b.open()
    await until(lambda: done == ["both"])
    w.stop()


async def test_idle_helpers_exit_after_idle_s_and_use_nothing_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[threading.Thread] = []

    def start_watched(fn: Callable[[], object]) -> None:  # (so that the test sees it end)
        started.append(threading.Thread(target=fn, daemon=True))
        started[-1].start()

    monkeypatch.setattr(_events, "start_thread", start_watched)
    w, _ = watcher(idle_s=0)
    stream, done = HostStream(), []
    w.after([stream], lambda: done.append(1))
    await until(lambda: done == [1])
    assert started
    await until(lambda: not any(t.is_alive() for t in started))


async def test_spin_polls_on_the_loop_while_told_to(monkeypatch: pytest.MonkeyPatch) -> None:
    # Silence the helper threads: only the loop's polling can see the event complete.
    monkeypatch.setattr(EventWatcher, "_on_synced", lambda self: None)
    w, _ = watcher()
    stream, gate, done = HostStream(), Gate(), []
    stream.launch(gate)
    w.after([stream], lambda: done.append(1))
    w.spin(30, lambda: True)
    gate.open()
    await until(lambda: done == [1])
    w.spin(30, lambda: False)  # nothing pending: a no-op
    await anyio.lowlevel.checkpoint()
    w.stop()


async def test_one_wake_up_serves_every_event_that_completed_meanwhile() -> None:
    """Events on eight streams complete while the loop is busy: one post drains them all."""
    w, backend = watcher(poll_s=0)  # (helpers only)
    posts: list[object] = []

    class CountingPort:
        def __init__(self, port: LoopPort) -> None:
            self.port = port

        def post(self, fn: Callable[..., object], *args: object) -> bool:
            posts.append(fn)
            return self.port.post(fn, *args)

    w._port = CountingPort(w._port)  # type: ignore[assignment]  # (helpers start after this)
    gate, streams, done = Gate(), [HostStream() for _ in range(8)], []
    for i, stream in enumerate(streams):
        stream.launch(gate)
        w.add(stream, backend.record(stream), lambda i=i: done.append(i))
    gate.open()
    for stream in streams:  # the loop is held here, not yielding, until every helper reported
        stream.synchronize()
    while len(w._synced) < 8:
        threading.Event().wait(0.001)
    await until(lambda: len(done) == 8)
    assert sorted(done) == list(range(8)) and len(posts) == 1 and len(w) == 0
    # and the next completion, after that drain, wakes the loop again
    later = HostStream()
    w.add(later, backend.record(later), lambda: done.append(8))
    await until(lambda: len(done) == 9)
    assert len(posts) == 2
    w.stop()


async def test_the_loop_polls_on_a_timer_while_events_are_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the helpers silenced, the poll timer alone completes the event; once nothing is
    pending, no timer is left armed (an idle watcher costs no CPU)."""
    monkeypatch.setattr(EventWatcher, "_on_synced", lambda self: None)
    w, backend = watcher()
    assert w._tick is None
    stream, gate, done = HostStream(), Gate(), []
    stream.launch(gate)
    w.add(stream, backend.record(stream), lambda: done.append(1))
    assert w._tick is not None
    gate.open()
    await until(lambda: done == [1])
    assert len(w) == 0 and w._tick is None
    w.stop()


async def test_no_poll_timer_when_polling_is_off() -> None:
    backend = HostBackend()
    w = EventWatcher(backend, LoopPort(), poll_s=0)
    stream, done = HostStream(), []
    w.add(stream, backend.record(stream), lambda: done.append(1))
    assert w._tick is None
    await until(lambda: done == [1])
    w.stop()
