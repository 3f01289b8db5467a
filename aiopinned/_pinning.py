"""The pinning side: what a pool runs in worker threads (pin, unpin, wait for streams).

Everything here blocks for milliseconds to seconds and never runs on the loop thread.  It reaches
threads only through :mod:`._loopport`: ``run_off_loop`` for work a caller awaits (and whose
outcome is adopted if the caller leaves first), ``run_detached`` for work nobody awaits (the
reaper thread, which finalizers may hand work to).  The only pool state it touches is the
counters' thread-safe timing records.

Unpinning tries every block, whatever fails: a block whose unpin failed is still pinned, and is
reported back (``StillPinned``) so that the pool keeps counting it instead of pinning past its cap.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import time
from collections.abc import Callable, Collection, Hashable
from functools import partial
from typing import Any

from ._block import NO_STREAMS, Block
from ._loopport import LoopPort, run_detached, run_off_loop, start_thread
from ._reservations import Plan
from ._stats import Counters
from ._waiters import InFlight
from .backends import Backend

log = logging.getLogger("aiopinned")

#: blocks up to this size are zeroed on the loop (at most ~100 µs of it); larger ones in the
#: pool's scrubber thread (handing over and back costs about as much as zeroing 2 MiB)
SCRUB_INLINE_BYTES = 2 << 20


class _Job:
    """A block to zero, and what to call on the loop once it is zeroed."""

    __slots__ = ("block", "then")

    def __init__(self, block: Block, then: Callable[[], object]) -> None:
        self.block = block
        self.then: Callable[[], object] | None = then


Orphan = Callable[[Any, BaseException | None], None]
Unpinned = tuple[list[Block], "Exception | None"]  # still pinned, and the first error


class StillPinned(Exception):
    """Some blocks could not be unpinned: ``blocks`` are still pinned; ``error`` is the first
    failure (what the caller sees)."""

    def __init__(self, blocks: list[Block], error: BaseException) -> None:
        super().__init__(f"{len(blocks)} blocks could not be unpinned: {error}")
        self.blocks = blocks
        self.error = error


def log_late(result: object, error: BaseException | None) -> None:
    """``on_orphan`` for work whose outcome nobody needs, only its failure noted."""
    if error is not None:
        log.error("aiopinned: work finished with an error after its caller left", exc_info=error)


class Pinning:
    """Pins and unpins blocks through a backend, off the loop."""

    __slots__ = ("_backend", "_counters", "_port", "_scrubs", "background")

    def __init__(self, backend: Backend, port: LoopPort, counters: Counters) -> None:
        self._backend = backend
        self._port = port
        self._counters = counters
        self.background = InFlight()  # blocks being zeroed or trimmed in threads
        self._scrubs: queue.SimpleQueue[_Job | None] | None = None

    def scrub(self, block: Block, then: Callable[[], object]) -> None:
        """Loop thread: zero ``block`` (so no owner sees the last one's data), then ``then()``.
        A large block is zeroed in the pool's scrubber thread, and ``then()`` posted back."""
        if block.size <= SCRUB_INLINE_BYTES:
            ctypes.memset(block.ptr, 0, block.size)
            then()
            return
        if self._scrubs is None:
            self._scrubs = queue.SimpleQueue()
            start_thread(partial(self._scrubber, self._scrubs))
        self.background.started()
        self._scrubs.put(_Job(block, then))

    def _scrubber(self, jobs: queue.SimpleQueue[_Job | None]) -> None:
        while (job := jobs.get()) is not None:
            ctypes.memset(job.block.ptr, 0, job.block.size)
            # ``then`` holds the pool: the loop empties the job, so this thread keeps no
            # reference to it once the block is back (a pool dropped without aclose() must be
            # collectable, and its pinned memory with it, however late this thread runs)
            if not self._port.post(self._scrubbed, job):
                return  # the loop is gone: nobody to give the block to

    def _scrubbed(self, job: _Job) -> None:
        then, job.then = job.then, None
        assert then is not None
        then()
        self.background.finished()

    def close(self) -> None:
        """Let the scrubber thread go (once the pool has waited for its scrubs)."""
        if self._scrubs is not None:
            self._scrubs.put(None)
            self._scrubs = None

    async def grow(self, plan: Plan, *, on_orphan: Orphan) -> int:
        """Unpin ``plan``'s victims, then pin its block; its address.

        Raises ``StillPinned`` (and pins nothing) if a victim could not be unpinned.
        """
        return await run_off_loop(self._port, self._unpin_then_pin, plan, on_orphan=on_orphan)

    async def unpin(self, blocks: list[Block], *, then: Callable[[list[Block]], object]) -> None:
        """Unpin blocks that are already out of the pool's cache and registry.

        ``then(still_pinned)`` runs on the loop once the thread is done, exactly once, whether
        or not the caller is still there.  The caller then sees the first failure, if any (the
        backend's own error).
        """

        def orphaned(outcome: Unpinned | None, error: BaseException | None) -> None:
            log_late(None, error if outcome is None else outcome[1])
            then(blocks if outcome is None else outcome[0])

        try:
            still, error = await run_off_loop(
                self._port, self._try_unpin, blocks, on_orphan=orphaned
            )
        except Exception:  # (a cancelled caller is settled by `orphaned`, when the thread ends)
            then(blocks)
            raise
        then(still)
        if error is not None:
            raise error

    def unpin_soon(self, blocks: list[Block], then: Callable[[list[Block]], object]) -> None:
        """Loop thread: unpin ``blocks`` in a thread of their own, nobody awaiting; then
        ``then(still_pinned)`` on the loop."""

        def work() -> None:
            still, _ = self._try_unpin(blocks)
            self._port.post(done, still)

        def done(still: list[Block]) -> None:
            self.background.finished()
            then(still)

        self.background.started()
        start_thread(work)

    def unpin_after_streams(self, block: Block) -> None:
        """Any thread, finalizers included: unpin ``block`` once the work queued on its streams
        has run, in the reaper thread.  A stream that cannot be waited on leaves the block
        pinned until the process ends: that is safe, and unpinning it might not be."""
        keys, backend = list(block.streams), self._backend
        block.streams = NO_STREAMS

        def work() -> None:
            for key in keys:
                try:
                    backend.synchronize_stream(key)
                except Exception:
                    log.exception("aiopinned: stream %r cannot be waited on; %r stays", key, block)
                    return
            self._try_unpin([block])

        run_detached(work)

    def return_after_streams(self, keys: Collection[Hashable], then: Callable[[], object]) -> None:
        """``then()`` on the loop once the work queued on ``keys`` has run (waited for in the
        reaper thread): the fallback when no event could be recorded."""
        backend = self._backend

        def work() -> None:
            for key in keys:
                try:
                    backend.synchronize_stream(key)
                except Exception:  # the device is gone: nothing can still be reading
                    log.exception("aiopinned: stream %r cannot be waited on", key)
            self._port.post(then)

        run_detached(work)

    # -- in the worker thread -----------------------------------------------------------------
    def _unpin_then_pin(self, plan: Plan) -> int:
        still, error = self._try_unpin(plan.victims)
        if error is not None:
            raise StillPinned(still, error)
        t0 = time.perf_counter()
        ptr = self._backend.alloc(plan.size)
        self._counters.pinned((time.perf_counter() - t0) * 1e6)
        return ptr

    def _try_unpin(self, blocks: list[Block]) -> Unpinned:
        """Unpin every block that can be: those that could not (still pinned), and the first
        error."""
        still, first = [], None
        for block in blocks:
            t0 = time.perf_counter()
            try:
                self._backend.free(block.ptr, block.size)
            except Exception as exc:
                log.warning("aiopinned: unpinning %r failed: %s", block, exc)
                still.append(block)
                first = first or exc
                continue
            self._counters.unpinned((time.perf_counter() - t0) * 1e6)
        return still, first
