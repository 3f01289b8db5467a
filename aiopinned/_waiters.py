"""A parking lot of callers waiting for room: strict FIFO, and grants handed over before waking.

It knows nothing of blocks: a waiter parks with a size and a deadline, and whoever has something
for the head *hands* it over (``unpark``) before the head runs, as trio's ``ParkingLot`` does.  So
a waiter that is cancelled, or whose deadline passes, either never got anything or already owns
its grant, and the grant is passed on (``on_abandon``) instead of being lost (CPython gh-90155,
bpo-37658).

Invariants:

* a waiter is in the queue exactly while it has neither a grant nor an error;
* only the head is ever handed a grant (nobody overtakes it);
* whoever keeps the lot keeps ``bool(lot)`` implying that the head cannot be served now.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

G = TypeVar("G")


class InFlight:
    """A count of work in flight, and a way to wait for it to reach zero (loop thread only)."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: list[anyio.Event] = []

    def started(self) -> None:
        self.count += 1

    def finished(self) -> None:
        self.count -= 1
        if not self.count and self._idle:
            idle, self._idle = self._idle, []
            for event in idle:
                event.set()

    async def wait_idle(self) -> None:
        if self.count:
            idle = anyio.Event()
            self._idle.append(idle)
            await idle.wait()


class _Waiter(Generic[G]):
    __slots__ = ("error", "event", "grant", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.event = anyio.Event()
        self.grant: G | None = None
        self.error: BaseException | None = None


class ParkingLot(Generic[G]):
    """FIFO waiters for sizes, each woken with a grant of type ``G`` or an error.

    Args:
        on_abandon: called on the loop with what a leaving waiter held: its grant, to pass on,
            or ``None`` if it held nothing (the head may have changed: serve the lot again).
        on_wait: called with the microseconds each wait took, however it ended.
    """

    __slots__ = ("_on_abandon", "_on_wait", "_queue")

    def __init__(
        self, on_abandon: Callable[[G | None], None], on_wait: Callable[[float], None]
    ) -> None:
        self._queue: deque[_Waiter[G]] = deque()
        self._on_abandon = on_abandon
        self._on_wait = on_wait

    @property
    def queue(self) -> deque[_Waiter[G]]:
        """The waiters, for a hot path's emptiness check (a deque's truth test costs no Python
        call); read it, never change it.  The same deque for the lot's whole life."""
        return self._queue

    def __len__(self) -> int:
        return len(self._queue)

    def __bool__(self) -> bool:
        return bool(self._queue)

    def serve(self, find: Callable[[int], G | None]) -> None:
        """Hand out ``find(head size)`` to the head, in FIFO order, until it finds nothing."""
        queue = self._queue
        while queue:
            grant = find(queue[0].size)
            if grant is None:
                return
            self.unpark(grant)

    def unpark(self, grant: G) -> None:
        """Hand ``grant`` to the head and wake it; from then on it owns the grant."""
        waiter = self._queue.popleft()
        waiter.grant = grant
        waiter.event.set()

    def close(self, error: BaseException) -> None:
        """Wake every waiter with ``error`` (each raises its own copy of it)."""
        waiters = list(self._queue)
        self._queue.clear()
        for waiter in waiters:
            waiter.error = error
            waiter.event.set()

    async def park(self, size: int, deadline: float) -> G:
        """Wait at the back of the queue until handed a grant.

        Raises:
            TimeoutError: nothing was handed over by ``deadline`` (``anyio.current_time()``).
            the error given to :meth:`close`, or the caller's cancellation; either way the
            waiter has left the queue and what it held went to ``on_abandon``.
        """
        waiter: _Waiter[G] = _Waiter(size)
        self._queue.append(waiter)
        start = time.perf_counter()
        try:
            if deadline == math.inf:  # (no scope to enter and leave: the wake-up's hot path)
                await waiter.event.wait()
            else:
                with anyio.CancelScope(deadline=deadline):
                    await waiter.event.wait()
        except BaseException:
            self._on_abandon(self._leave(waiter))
            raise
        finally:
            self._on_wait((time.perf_counter() - start) * 1e6)
        if waiter.grant is not None:  # also when the deadline raced the handoff: keep it
            return waiter.grant
        if waiter.error is not None:
            raise type(waiter.error)(*waiter.error.args)
        self._on_abandon(self._leave(waiter))
        raise TimeoutError(f"nothing for a request of {size} bytes came back in time")

    def _leave(self, waiter: _Waiter[G]) -> G | None:
        with contextlib.suppress(ValueError):
            self._queue.remove(waiter)
        grant, waiter.grant = waiter.grant, None
        return grant

    def __repr__(self) -> str:
        head = f", head wants {self._queue[0].size}" if self._queue else ""
        return f"<ParkingLot waiters={len(self._queue)}{head}>"
