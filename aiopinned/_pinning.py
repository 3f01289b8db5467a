"""The pinning side: what a pool runs in worker threads (pin, unpin, wait for events).

Everything here blocks for milliseconds to seconds and never runs on the loop thread.  It reaches
threads only through :mod:`._loopport`: ``run_off_loop`` for work a caller awaits (and whose
outcome is adopted if the caller leaves first), ``run_detached`` for work nobody awaits.  The only
pool state it touches is the counters' thread-safe timing records.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ._block import Block
from ._loopport import LoopPort, run_detached, run_off_loop
from ._reservations import Plan
from ._stats import Counters
from .backends import Backend

log = logging.getLogger("aiopinned")

Orphan = Callable[[Any, BaseException | None], None]


def log_late(result: object, error: BaseException | None) -> None:
    """``on_orphan`` for work whose outcome nobody needs, only its failure noted."""
    if error is not None:
        log.error("aiopinned: work finished with an error after its caller left", exc_info=error)


class Pinning:
    """Pins and unpins blocks through a backend, off the loop."""

    __slots__ = ("_backend", "_counters", "_port")

    def __init__(self, backend: Backend, port: LoopPort, counters: Counters) -> None:
        self._backend = backend
        self._port = port
        self._counters = counters

    async def grow(self, plan: Plan, *, on_orphan: Orphan) -> int:
        """Unpin ``plan``'s victims, then pin its block; its address."""
        return await run_off_loop(self._port, self._unpin_then_pin, plan, on_orphan=on_orphan)

    async def unpin(self, blocks: list[Block], *, then: Callable[[], object]) -> None:
        """Unpin blocks that are already out of the pool's cache and registry.

        ``then()`` runs on the loop once the thread is done, exactly once, whether or not the
        caller is still there to see it.
        """

        def orphaned(result: object, error: BaseException | None) -> None:
            log_late(result, error)
            then()

        try:
            await run_off_loop(self._port, self._unpin_all, blocks, on_orphan=orphaned)
        except Exception:  # a cancelled caller is settled by `orphaned`, when the thread ends
            then()
            raise
        then()

    async def synchronize(self, events: list[Any]) -> None:
        """Wait until every one of ``events`` has completed."""
        await run_off_loop(self._port, self._synchronize_all, events, on_orphan=log_late)

    def unpin_after_streams(self, block: Block) -> None:
        """Unpin ``block`` once the work queued on its streams is done, in a thread nobody
        awaits (any thread)."""
        events = [self._backend.record(key) for key in block.streams]
        block.streams.clear()

        def work() -> None:
            self._synchronize_all(events)
            for event in events:
                self._backend.release_event(event)
            self._unpin_all([block])

        run_detached(work, "aiopinned-unpin")

    # -- in the worker thread -----------------------------------------------------------------
    def _unpin_then_pin(self, plan: Plan) -> int:
        self._unpin_all(plan.victims)
        t0 = time.perf_counter()
        ptr = self._backend.alloc(plan.size)
        self._counters.pinned((time.perf_counter() - t0) * 1e6)
        return ptr

    def _unpin_all(self, blocks: list[Block]) -> None:
        for block in blocks:
            t0 = time.perf_counter()
            self._backend.free(block.ptr, block.size)
            self._counters.unpinned((time.perf_counter() - t0) * 1e6)

    def _synchronize_all(self, events: list[Any]) -> None:
        for event in events:
            self._backend.synchronize(event)
