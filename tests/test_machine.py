"""A stateful Hypothesis machine: the public API under a cap, on the host backend, against a model.

Rules allocate (awaiting in the background, with and without timeouts, and ``allocate_nowait``),
free (with and without ``record_stream`` on gated ``HostStream``s), hold and release streams,
cancel waiting callers, ``process_events``, ``empty_cache`` and ``reserve`` (segments carved into
blocks of odd and class sizes).  After every step:

* no two live buffers overlap;
* ``active_bytes`` is the sum of the live buffers' capacities, and ``reserved <= max_bytes``;
* every live buffer still holds what its owner wrote (nobody else changed it);
* no block is handed out while a stream that recorded it before it was freed is still held.

``AIOPINNED_FUZZ_EXAMPLES`` sets how many examples run (1000 by default).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from aiopinned import HostStream, PinnedBuffer, PinnedPool, WouldBlock
from aiopinned._block import FREE

KB = 1024
CAP = 64 * KB
SIZES = st.sampled_from([1, 100, KB, 3 * KB, 4 * KB, 10 * KB, 16 * KB, 33 * KB, 64 * KB])
T = TypeVar("T")
EXAMPLES = int(os.environ.get("AIOPINNED_FUZZ_EXAMPLES", "1000"))


class Stream:
    """A HostStream that the machine can hold (its work waits) and release."""

    def __init__(self) -> None:
        self.stream = HostStream()
        self.gate: threading.Event | None = None
        self.blocks: list[tuple[int, int]] = []  # (ptr, capacity) freed while held

    def hold(self) -> None:
        self.gate = threading.Event()
        self.stream.launch(self.gate.wait, 60)

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()
        self.gate, self.blocks = None, []


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool = PinnedPool("host", max_bytes=CAP, segment_bytes=16 * KB)
        self.loop.run_until_complete(self.pool.open())
        self.streams = [Stream(), Stream()]
        self.live: dict[int, tuple[PinnedBuffer, int]] = {}  # ptr -> (buffer, fill byte)
        self.tasks: list[asyncio.Task[PinnedBuffer]] = []
        self.sizes: dict[asyncio.Task[PinnedBuffer], int] = {}
        self.settled = True
        self.fills = 0

    # -- helpers --------------------------------------------------------------------------------
    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` from inside the running loop, as a coroutine of the application would."""

        async def inside() -> T:
            return fn()

        return self.run(inside())  # type: ignore[no-any-return]

    def settle(self) -> None:
        """Run the loop until every background caller has its buffer or is parked (growth runs
        in threads: bounded real time, a safety net rather than a timing)."""
        deadline = time.monotonic() + 30
        while True:
            self.run(asyncio.sleep(0.0005))
            self.collect()
            waiting = [t for t in self.tasks if not t.done()]
            if len(waiting) == self.pool.stats().waiters:
                self.settled = True
                return
            assert time.monotonic() < deadline, "a caller neither got a buffer nor waited"

    def collect(self) -> None:
        for task in [t for t in self.tasks if t.done()]:
            self.tasks.remove(task)
            if not task.cancelled() and task.exception() is None:
                self.received(task.result())
            elif not task.cancelled():
                assert isinstance(task.exception(), TimeoutError), task.exception()

    def received(self, buf: PinnedBuffer) -> None:
        lo, hi = buf.ptr, buf.ptr + buf.capacity
        for stream in self.streams:
            for ptr, cap in stream.blocks:
                assert hi <= ptr or ptr + cap <= lo, "a block came back while its stream ran"
        self.fills += 1
        fill = self.fills % 251 + 1
        ctypes.memset(buf.ptr, fill, buf.nbytes)
        self.live[buf.ptr] = (buf, fill)

    def check_contents(self, buf: PinnedBuffer, fill: int) -> None:
        assert ctypes.string_at(buf.ptr, buf.nbytes) == bytes([fill]) * buf.nbytes

    # -- rules ----------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        pass

    @rule(size=SIZES, timeout=st.sampled_from([None, None, 0, 0.001]), settle=st.booleans())
    def allocate(self, size: int, timeout: float | None, settle: bool) -> None:
        """Start a caller; without ``settle`` the next rule runs while it may still be growing,
        so callers also queue behind growth in flight."""
        task = self.loop.create_task(self.pool.allocate(size, timeout=timeout))
        self.tasks.append(task)
        self.sizes[task] = size
        if settle:
            self.settle()
        else:
            self.settled = False

    @rule(size=SIZES)
    def allocate_nowait(self, size: int) -> None:
        try:
            buf = self.call(lambda: self.pool.allocate_nowait(size))
        except WouldBlock:
            return
        self.received(buf)

    # Rules draw plain numbers, never from the state: threads make the state differ a little
    # between runs, and Hypothesis must be able to replay a run's draws.
    @rule(pick=st.integers(0, 1 << 16), record=st.sampled_from([None, 0, 1]))
    def free(self, pick: int, record: int | None) -> None:
        if not self.live:
            return
        buf, fill = self.live.pop(sorted(self.live)[pick % len(self.live)])
        self.check_contents(buf, fill)
        if record is not None:
            stream = self.streams[record]
            assert buf.record_stream(stream.stream)  # (a held stream: its "copy" still runs)
            if stream.gate is not None:
                stream.blocks.append((buf.ptr, buf.capacity))
        self.call(buf.free)
        self.settle()

    @rule(i=st.sampled_from([0, 1]))
    def hold_stream(self, i: int) -> None:
        if self.streams[i].gate is None:
            self.streams[i].hold()

    @rule(i=st.sampled_from([0, 1]))
    def release_stream(self, i: int) -> None:
        if self.streams[i].gate is not None:
            self.streams[i].release()
            self.streams[i].stream.synchronize()
            self.settle()

    @rule(pick=st.integers(0, 1 << 16))
    def cancel_a_waiter(self, pick: int) -> None:
        waiting = [t for t in self.tasks if not t.done()]
        if waiting:
            waiting[pick % len(waiting)].cancel()
            self.settle()

    @rule()
    def process_events(self) -> None:
        self.call(self.pool.process_events)
        self.settle()

    @rule(total=st.sampled_from([4 * KB, 12 * KB, 40 * KB]),
          block=st.sampled_from([KB, 3 * KB, 4 * KB, 16 * KB]))  # fmt: skip
    def reserve(self, total: int, block: int) -> None:
        self.run(self.pool.reserve(total, block_bytes=block))
        self.settle()

    @rule()
    def empty_cache(self) -> None:
        self.run(self.pool.empty_cache())
        self.settle()

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def buffers_do_not_overlap_and_the_counts_add_up(self) -> None:
        self.collect()  # (a caller started without settling may have its buffer by now)
        spans = sorted((b.ptr, b.ptr + b.capacity) for b, _ in self.live.values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
        s = self.pool.stats()
        assert s.active_bytes == sum(b.capacity for b, _ in self.live.values())
        assert s.reserved_bytes <= CAP and s.peak_reserved_bytes <= CAP
        # segments and stranded bytes, counted block by block from the registry
        segments = {b.segment for b in self.pool._cache.registry.blocks() if b.segment}
        stranded = 0
        for seg in segments:
            idle = [b.size for b in seg.blocks if b.state == FREE]
            stranded += sum(idle) if len(idle) < len(seg.blocks) else 0
        assert (s.segments, s.stranded_bytes) == (len(segments), stranded)

    @invariant()
    def a_waiting_caller_could_not_be_served(self) -> None:
        """Liveness: once things settle, the head of the queue waits only if it cannot grow,
        even by unpinning every idle block (the pool's own invariant, seen from outside)."""
        waiting = [t for t in self.tasks if not t.done()]
        if self.settled and waiting:
            s, head = self.pool.stats(), self.sizes[waiting[0]]
            unpinnable = s.free_bytes - s.stranded_bytes  # (a segment goes only whole)
            assert head > CAP - s.reserved_bytes + unpinnable, ("could grow", head, s)

    @invariant()
    def nobody_else_wrote_into_a_live_buffer(self) -> None:
        for buf, fill in self.live.values():
            self.check_contents(buf, fill)

    def teardown(self) -> None:
        for stream in self.streams:
            if stream.gate is not None:
                stream.release()
        for task in self.tasks:
            task.cancel()
        self.run(asyncio.sleep(0))
        self.collect()
        for buf, _ in self.live.values():
            buf.free()
        self.run(self.pool.aclose())
        s = self.pool.stats()
        assert (s.active_bytes, s.waiters, s.reserved_bytes) == (0, 0, 0), s
        self.loop.close()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_machine_runs_in_ci() -> None:
    """The machine is not a stub: it is collected and set to run the examples asked for."""
    assert TestPoolMachine.settings.max_examples == EXAMPLES >= 1
    pytest.importorskip("hypothesis")
