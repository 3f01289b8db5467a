"""Bringing up a tier while the server serves: ``reserve`` runs, in the caller's task or in the
background, and says how far it has got.

A :class:`Reserving` is one reserve: its total, the bytes pinned so far, whether it is done, and
an awaitable for its outcome, so that a server can keep ``/health`` not ready until its tier is up
(``await job.wait()``, or ``job.done()`` at each probe).  The pool's ``stats()`` sums the reserves
still running (``reserve_target_bytes``, ``reserve_done_bytes``).  Allocations meanwhile are served
from whatever is pinned already: a reserve pins one segment at a time, in a thread, and each
segment's blocks join the free list as soon as it is pinned.

Cancelling a reserve (``cancel()``, the awaiting task's cancellation, or the pool closing) keeps
the whole segments pinned so far, and the segment in flight once its thread is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import anyio

__all__ = ["Reserves", "Reserving"]

Run = Callable[[Callable[[int, int], None]], Awaitable[int]]


class Reserving:
    """A reserve of ``total_bytes``: ``PinnedPool.start_reserve`` returns one.

    ``done_bytes`` is what it has pinned so far; ``await job`` (or ``await job.wait()``) gives
    the bytes pinned in all once it is done, or raises what stopped it (``PinnedMemoryError``,
    ``PoolClosed``); a cancelled one gives what it kept.
    """

    __slots__ = ("_cancelled", "_done", "_error", "_progress", "_run", "_scope", "_stop",
                 "done_bytes", "ended", "total_bytes")  # fmt: skip

    def __init__(self, total: int, run: Run, progress: Callable[[int, int], object] | None) -> None:
        self.total_bytes = total
        self.done_bytes = 0
        self._run, self._progress = run, progress
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._error: BaseException | None = None
        #: what a cancel makes it raise (``None``: a cancelled reserve returns what it kept)
        self._stop: BaseException | None = None
        self._cancelled = False
        #: told when it ends (``Reserves`` stops counting it)
        self.ended: Callable[[Reserving], object] = lambda job: None

    def done(self) -> bool:
        """Whether it has ended (all pinned, stopped at the cap, failed or cancelled)."""
        return self._done.is_set()

    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, error: BaseException | None = None) -> None:
        """Stop pinning: the whole segments pinned so far stay (the one in flight too, once its
        thread is done); ``error``: raise it, rather than return what was kept.  Loop thread;
        nothing happens once it is done."""
        if not self.done():
            self._cancelled, self._stop = True, error
        self._scope.cancel()

    async def wait(self) -> int:
        """The bytes it pinned, once it is done; raises what stopped it."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self.done_bytes

    def __await__(self) -> Generator[Any, None, int]:
        return self.wait().__await__()

    def _advance(self, done: int, total: int) -> None:
        self.done_bytes = done
        if self._progress is not None:
            self._progress(done, total)

    async def run(self) -> int:
        """Pin, in the calling task; cancelling the task (or ``cancel()``) stops it."""
        try:
            with self._scope:
                await self._run(self._advance)
            if self._scope.cancelled_caught and self._stop is not None:
                raise self._stop
        except Exception as exc:
            self._error = exc
            raise
        finally:
            self._cancelled = self._cancelled or self._scope.cancelled_caught
            self._done.set()
            self.ended(self)
        return self.done_bytes

    async def run_detached(self) -> None:
        """``run`` as a task nobody awaits: its error is kept for ``wait()``."""
        with contextlib.suppress(Exception):  # (kept in self._error)
            await self.run()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<Reserving {self.done_bytes}/{self.total_bytes} bytes {state}>"


class Reserves:
    """The reserves a pool has running (the loop thread only)."""

    __slots__ = ("running",)

    def __init__(self) -> None:
        self.running: set[Reserving] = set()

    def track(self, job: Reserving) -> Reserving:
        """Count ``job`` until it ends (it has not started yet)."""
        self.running.add(job)
        job.ended = self.running.discard
        return job

    def gauges(self) -> dict[str, int]:
        return {
            "reserve_target_bytes": sum(job.total_bytes for job in self.running),
            "reserve_done_bytes": sum(job.done_bytes for job in self.running),
        }

    def close(self, error: BaseException) -> None:
        """The pool is closing: stop every reserve (each keeps its whole segments, for the close
        to unpin, and raises ``error``)."""
        for job in list(self.running):
            job.cancel(error)
