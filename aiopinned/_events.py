"""Pending events, one FIFO per stream, and the watcher that sees them complete.

The seed keeps one global deque and ``process_events`` stops at the first event that is not
ready, so one stuck stream holds back every block behind it (PyTorch #183501: 90 GB piled up).
Here each stream has its own FIFO: events on one stream complete in order, so only the oldest
event of each stream is ever worth checking, and a stuck stream holds back only its own blocks.

How completion is seen:

* Each stream with pending events has a helper thread that blocks in the backend's
  ``synchronize(event)`` (``cudaEventSynchronize``, GIL released) on its events in order, then
  puts the event on a shared queue (``_synced``) and wakes the loop (``call_soon_threadsafe``)
  only if no wake-up is already on its way: one wake-up serves every event that completed
  meanwhile, on every stream.  The loop clears that flag *before* it drains the queue, so an
  event put after the drain always brings its own wake-up.
* While events are pending, the loop also polls them every ``poll_s`` (a timer, 1 ms): a loop
  kept busy with Python work starves the helper threads of the GIL (for seconds on the H200
  host: it takes the GIL straight back after every ``select``), while it reaches a due timer
  within one iteration.  On an idle loop the helpers come first.
* With nothing pending, no timer is armed and helpers sleep on a queue (no CPU), then exit
  after ``idle_s``.
* ``poll()`` (the seed's ``process_events``) drains every stream's completed head events at once.
* ``spin()`` (the pool's opt-in ``spin_s``) polls on the loop, once per iteration, while callers
  wait: a waiter then resumes within a loop iteration of its copy ending, without the
  cross-thread wake-up.

An event is released back to the backend only once both the FIFO and its helper are done with
it, so a helper never waits on an event that has been recycled.

When the backend fails (faults are part of the contract, not an afterthought):

* a failing ``record`` leaves nothing half-watched: ``after`` records every event first, and on
  a failure releases those it made and raises;
* a failing ``query`` means "not known to be done": the helper thread's wait decides;
* a failing ``synchronize`` falls back to ``synchronize_stream`` (no event needed); only when
  that fails too is the device taken to be gone, and the event reported done (nothing can still
  be reading the memory), with an error logged;
* ``on_done`` runs before the event is released, so a failing release loses nothing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Hashable
from functools import partial
from typing import Any

from ._loopport import LoopPort, start_thread
from ._waiters import InFlight
from .backends.base import Backend

log = logging.getLogger("aiopinned")

#: seconds a helper thread lingers with nothing to wait on before it exits (by default)
HELPER_IDLE_S = 5.0
#: seconds between the loop's own polls while events are pending (by default): on the 2-core CI
#: host, polling every 100 us cost the server benchmark half its throughput, 1 ms nothing seen
POLL_S = 1e-3


class _Pending:
    __slots__ = ("event", "on_done", "refs", "synced")

    def __init__(self, event: Any, on_done: Callable[[], object]) -> None:
        self.event = event
        self.on_done = on_done
        self.refs = 2  # the stream's FIFO and its helper each hold one
        self.synced = False


class _Helper:
    """A thread that waits on one stream's events, in order, and reports each to the loop."""

    __slots__ = ("alive", "queue")

    def __init__(self, watcher: EventWatcher, key: Hashable) -> None:
        self.queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self.alive = True
        start_thread(partial(self._run, watcher, key))  # (not waiting for it: on the loop)

    def _run(self, watcher: EventWatcher, key: Hashable) -> None:
        backend, port, q, idle_s = watcher._backend, watcher._port, self.queue, watcher.idle_s
        while True:
            try:
                item = q.get(timeout=idle_s)
            except queue.Empty:
                with watcher._lock:
                    if q.empty():
                        self.alive = False
                        return
                continue
            if item is None:
                return
            _wait_for(backend, key, item.event)
            watcher._synced.append((key, item))
            if not watcher._woken:
                watcher._woken = True
                if not port.post(watcher._on_synced):
                    return  # the loop has stopped: nobody is left to hand blocks to


def _wait_for(backend: Backend, key: Hashable, event: Any) -> None:
    """Block until ``event`` (recorded on stream ``key``) has completed, or the device is gone."""
    try:
        backend.synchronize(event)
        return
    except Exception:
        log.warning("aiopinned: waiting on an event of stream %r failed; now on the stream", key)
    try:
        backend.synchronize_stream(key)
    except Exception:  # the device is gone: nothing can still be reading the memory
        log.exception("aiopinned: stream %r cannot be waited on; taking its work as ended", key)


class EventWatcher:
    """Pending events per stream; calls each event's ``on_done`` on the loop when it completes."""

    __slots__ = (
        "_backend",
        "_helpers",
        "_lock",
        "_port",
        "_spin_until",
        "_streams",
        "_synced",
        "_tick",
        "_woken",
        "idle_s",
        "pending",
        "poll_s",
    )

    def __init__(
        self,
        backend: Backend,
        port: LoopPort,
        idle_s: float = HELPER_IDLE_S,
        poll_s: float = POLL_S,
    ) -> None:
        self._backend = backend
        self._port = port
        #: seconds a helper thread with nothing to wait on lingers before it exits
        self.idle_s = idle_s
        #: seconds between the loop's polls while events are pending (0: helpers only)
        self.poll_s = poll_s
        self._tick: Callable[[], None] | None = None  # cancels the armed poll timer
        self._spin_until = -1.0  # < 0: not spinning
        self._streams: dict[Hashable, deque[_Pending]] = {}
        self._helpers: dict[Hashable, _Helper] = {}
        self._lock = threading.Lock()  # guards helper start/exit only
        #: (stream, event) the helpers have seen complete, for the loop to drain
        self._synced: deque[tuple[Hashable, _Pending]] = deque()
        self._woken = False  # a wake-up of the loop is on its way (set by helpers)
        #: events recorded and not yet seen to complete (a closing pool waits for none left)
        self.pending = InFlight()

    def __len__(self) -> int:
        """Events recorded and not yet seen to complete."""
        return self.pending.count

    def add(self, key: Hashable, event: Any, on_done: Callable[[], object]) -> None:
        """Watch ``event``, recorded on stream ``key``; ``on_done()`` runs on the loop after it."""
        item = _Pending(event, on_done)
        fifo = self._streams.get(key)
        if fifo is None:
            fifo = self._streams[key] = deque()
        fifo.append(item)
        self.pending.started()
        if self._tick is None and self.poll_s:
            self._tick = self._port.call_later(self.poll_s, self._on_tick)
        with self._lock:
            helper = self._helpers.get(key)
            if helper is None or not helper.alive:
                helper = self._helpers[key] = _Helper(self, key)
            helper.queue.put(item)

    def after(self, keys: Collection[Hashable], on_done: Callable[[], object]) -> None:
        """Record an event on each stream in ``keys`` (not empty); ``on_done()`` runs on the loop
        once all of them have completed (the count is the seed's per-block ``event_count_``)."""
        count, backend, recorded = [len(keys)], self._backend, []

        def one_done() -> None:
            count[0] -= 1
            if count[0] == 0:
                on_done()

        try:
            for key in keys:
                recorded.append((key, backend.record(key)))
        except BaseException:
            for _, event in recorded:
                self._release(event)
            raise
        done = one_done if len(keys) > 1 else on_done
        for key, event in recorded:
            self.add(key, event, done)

    def poll(self) -> int:
        """Complete every event that has finished, on every stream; return how many."""
        done = 0
        for key in list(self._streams):
            done += self._drain(key)
        return done

    def pending_events(self) -> list[Any]:
        return [item.event for fifo in self._streams.values() for item in fifo]

    def spin(self, seconds: float, keep_going: Callable[[], bool]) -> None:
        """Poll once per loop iteration, for up to ``seconds``, while events are pending and
        ``keep_going()`` holds.  Loop thread only; a no-op while already spinning."""
        if seconds and self._spin_until < 0 and self.pending.count:
            self._spin_until = time.monotonic() + seconds
            self._port.call_soon(self._spin_step, keep_going)

    def _spin_step(self, keep_going: Callable[[], bool]) -> None:
        if not (self.pending.count and keep_going() and time.monotonic() <= self._spin_until):
            self._spin_until = -1.0
            return
        self.poll()
        self._port.call_soon(self._spin_step, keep_going)

    def _on_tick(self) -> None:
        self._tick = None
        self.poll()
        if self.pending.count:
            self._tick = self._port.call_later(self.poll_s, self._on_tick)

    def stop(self) -> None:
        """Let idle helpers exit now (busy ones finish their current event first); disarm the
        poll timer (loop thread)."""
        if self._tick is not None:
            self._tick()
            self._tick = None
        with self._lock:
            helpers, self._helpers = list(self._helpers.values()), {}
        for helper in helpers:
            helper.queue.put(None)

    def _on_synced(self) -> None:
        """Loop thread, woken by a helper: drain every stream that has a synced event."""
        self._woken = False  # (first: whatever a helper puts from now on wakes the loop again)
        synced = self._synced
        while synced:
            key, item = synced.popleft()
            item.synced = True
            self._unref(item)
            self._drain(key)

    def _drain(self, key: Hashable) -> int:
        fifo = self._streams.get(key)
        done = 0
        while fifo and (fifo[0].synced or self._query(key, fifo[0].event)):
            item = fifo.popleft()
            self.pending.finished()
            done += 1
            try:
                item.on_done()
            finally:
                self._unref(item)
        if fifo is not None and not fifo:
            del self._streams[key]
        return done

    def _query(self, key: Hashable, event: Any) -> bool:
        try:
            return self._backend.query(event)
        except Exception:  # not known to be done: the helper's wait decides
            log.warning("aiopinned: querying an event of stream %r failed", key, exc_info=True)
            return False

    def _unref(self, item: _Pending) -> None:
        item.refs -= 1
        if item.refs == 0:
            self._release(item.event)

    def _release(self, event: Any) -> None:
        try:
            self._backend.release_event(event)
        except Exception:  # the event is lost to the backend's cache; nothing else is
            log.warning("aiopinned: releasing an event failed", exc_info=True)
