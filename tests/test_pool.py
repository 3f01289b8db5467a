"""PinnedPool under a cap: waiting for blocks, FIFO fairness, cancellation, timeouts, nowait,
growth, threads and loops.  (The seed's own behaviours are in test_seed_parity.py.)

Modelled on CPython's test_locks.py: waiters are queued one at a time (each until every task is
blocked), the loop is stepped, and the order in which they are served is compared as a list.
"""

from __future__ import annotations

import threading
import time

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from aiopinned import PinnedBuffer, PinnedPool, PoolClosed, WouldBlock

from .conftest import RecordingBackend, spin_until_past, until

pytestmark = pytest.mark.anyio

KB = 1024


class Waiters:
    """Tasks that each allocate, note the order they were served in, and keep their buffer."""

    def __init__(self, pool: PinnedPool, tg: anyio.abc.TaskGroup) -> None:
        self.pool, self.tg = pool, tg
        self.served: list[str] = []
        self.bufs: dict[str, PinnedBuffer] = {}
        self.errors: dict[str, BaseException] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}

    async def add(self, name: str, nbytes: int, timeout: float | None = None) -> None:
        """Start a waiter and return once it is queued (every task blocked)."""

        async def run() -> None:
            with self.scopes[name]:
                try:
                    buf = await self.pool.allocate(nbytes, timeout=timeout)
                except Exception as exc:
                    self.errors[name] = exc
                    return
                self.served.append(name)
                self.bufs[name] = buf

        self.scopes[name] = anyio.CancelScope()
        self.tg.start_soon(run)
        await wait_all_tasks_blocked()


async def test_a_request_larger_than_the_cap_fails_at_once() -> None:
    async with PinnedPool("host", max_bytes=64 * KB) as pool:
        with pytest.raises(ValueError, match="max_bytes"):
            await pool.allocate(64 * KB + 1)
        with pytest.raises(ValueError):
            pool.allocate_nowait(64 * KB + 1)
        assert (await pool.allocate(64 * KB)).capacity == 64 * KB


async def test_growth_pins_exactly_the_request_where_a_power_of_two_does_not_fit() -> None:
    async with PinnedPool("host", max_bytes=96 * KB, rounding="pow2") as pool:
        a = await pool.allocate(40 * KB)
        assert a.capacity == 64 * KB  # a power of two while it fits
        a.free()
        c = await pool.allocate(70 * KB)  # 128 KiB never fits: release `a`, pin exactly 70 KiB
        s = pool.stats()
        assert (c.capacity, s.reserved_bytes, s.num_host_free) == (70 * KB, 70 * KB, 1)


async def test_idle_blocks_that_do_not_fit_are_released_to_make_room(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording, max_bytes=64 * KB) as pool:
        small = [await pool.allocate(16 * KB) for _ in range(4)]
        for buf in small:
            buf.free()
        big = await pool.allocate(64 * KB)
        s = pool.stats()
        assert big.capacity == 64 * KB
        assert (s.reserved_bytes, s.free_blocks, s.num_host_free) == (64 * KB, 0, 4)
        assert s.peak_reserved_bytes <= 64 * KB


async def test_waiters_are_served_in_fifo_order() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        w = Waiters(pool, tg)
        for name in "abcde":
            await w.add(name, 4 * KB)
        assert pool.stats().waiters == 5
        held.free()
        for expected in "abcde":
            await wait_all_tasks_blocked()
            assert w.served[-1] == expected
            w.bufs[expected].free()
        assert w.served == list("abcde")
        s = pool.stats()
        assert (s.waiters, s.num_waits) == (0, 5)
        assert 0 < s.wait_time_us_max <= s.wait_time_us_total


async def test_a_newcomer_never_overtakes_a_queued_waiter() -> None:
    async with PinnedPool("host", max_bytes=8 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        idle = await pool.allocate(2 * KB)
        also_held = await pool.allocate(2 * KB)
        idle.free()  # an idle 2 KiB block that a small request could take
        w = Waiters(pool, tg)
        await w.add("big", 8 * KB)  # the head: needs everything back
        await w.add("small", 1 * KB)  # fits the idle block, but must not overtake "big"
        assert w.served == [] and pool.stats().waiters == 2
        with pytest.raises(WouldBlock):
            pool.allocate_nowait(1 * KB)
        also_held.free()
        await wait_all_tasks_blocked()
        assert w.served == []
        held.free()  # now releasing the idle blocks lets "big" grow to 8 KiB
        await until(lambda: w.served == ["big"])  # growth runs in a thread
        assert pool.stats().peak_reserved_bytes <= 8 * KB
        w.bufs["big"].free()  # too big for "small" under a cap: released, and 1 KiB pinned
        await until(lambda: w.served == ["big", "small"])
        assert w.bufs["small"].capacity == 1 * KB


async def test_a_waiter_cancelled_before_the_wake_leaves_the_queue() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        w = Waiters(pool, tg)
        await w.add("a", 4 * KB)
        await w.add("b", 4 * KB)
        w.scopes["a"].cancel()
        await wait_all_tasks_blocked()
        assert pool.stats().waiters == 1
        held.free()
        await wait_all_tasks_blocked()
        assert w.served == ["b"]


@pytest.mark.usefixtures("asyncio_only")  # (trio's side: the next test)
@pytest.mark.parametrize("behind", [True, False], ids=["waiter-behind", "nobody-behind"])
async def test_a_task_cancelled_after_the_handoff_passes_the_block_on(behind: bool) -> None:
    """gh-90155: the block was handed to a task that is cancelled before it runs (asyncio).

    It goes to the next waiter, or with nobody behind, back to the cache.
    """
    import asyncio

    async with PinnedPool("host", max_bytes=4 * KB) as pool:
        held = await pool.allocate(4 * KB)
        a = asyncio.ensure_future(pool.allocate(4 * KB))
        await wait_all_tasks_blocked()
        if behind:
            b = asyncio.ensure_future(pool.allocate(4 * KB))
            await wait_all_tasks_blocked()
        held.free()  # handed to a, which has not run yet
        a.cancel()
        await wait_all_tasks_blocked()
        assert a.cancelled()
        s = pool.stats()
        if behind:
            assert b.done() and b.result().ptr == held.ptr
            assert (s.active_requests, s.waiters, s.num_host_alloc) == (1, 0, 1)
        else:
            assert (s.free_blocks, s.active_requests, s.waiters) == (1, 0, 0)


async def test_a_waiter_cancelled_around_the_handoff_loses_no_block() -> None:
    """However the loop delivers the cancel, "a" never keeps the block and "b" gets it."""
    async with PinnedPool("host", max_bytes=4 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        ptr, got = held.ptr, []
        scope_a = anyio.CancelScope()

        async def a() -> None:
            with scope_a:
                async with pool.buffer(4 * KB):
                    await anyio.sleep_forever()

        async def b() -> None:
            async with pool.buffer(4 * KB) as buf:
                got.append(buf.ptr)

        tg.start_soon(a)
        await wait_all_tasks_blocked()
        tg.start_soon(b)
        await wait_all_tasks_blocked()
        held.free()
        scope_a.cancel()
        await wait_all_tasks_blocked()
        assert got == [ptr]
        s = pool.stats()
        assert (s.active_requests, s.waiters, s.free_blocks) == (0, 0, 1)


async def test_a_timeout_leaves_no_trace() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool:
        held = await pool.allocate(4 * KB)
        before = pool.stats()
        with pytest.raises(TimeoutError):
            await pool.allocate(4 * KB, timeout=0)  # the deadline is now: no real time passes
        after = pool.stats()
        assert (after.waiters, after.reserved_bytes, after.active_requests) == (
            0,
            before.reserved_bytes,
            1,
        )
        held.free()
        assert pool.stats().free_blocks == 1


async def test_a_timeout_that_races_a_handoff_returns_the_block() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        w = Waiters(pool, tg)
        deadline = anyio.current_time() + 0.001
        await w.add("a", 4 * KB, timeout=0.001)
        held.free()  # handed over...
        spin_until_past(deadline)  # ...and the deadline passes before "a" runs
        await wait_all_tasks_blocked()
        assert w.served == ["a"] and w.errors == {}


async def test_allocate_nowait_does_not_take_a_block_handed_to_a_woken_waiter() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        w = Waiters(pool, tg)
        await w.add("a", 4 * KB)
        held.free()  # "a" owns the block, though it has not run yet
        assert pool.stats().waiters == 0
        with pytest.raises(WouldBlock):
            pool.allocate_nowait(4 * KB)
        await wait_all_tasks_blocked()
        assert w.served == ["a"]


async def test_allocate_nowait_never_pins() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(WouldBlock):
            pool.allocate_nowait(100)
        (await pool.allocate(100)).free()
        assert pool.allocate_nowait(100).capacity == 128


async def test_closing_wakes_every_waiter_with_pool_closed() -> None:
    pool = PinnedPool("host", max_bytes=4 * KB)
    async with pool, anyio.create_task_group() as tg:
        held = await pool.allocate(4 * KB)
        w = Waiters(pool, tg)
        await w.add("a", 4 * KB)
        await w.add("b", 1 * KB)
        await pool.aclose()
        await wait_all_tasks_blocked()
        assert {k: type(v) for k, v in w.errors.items()} == {"a": PoolClosed, "b": PoolClosed}
        held.free()


async def test_a_cancelled_growth_is_adopted_not_leaked(recording: RecordingBackend) -> None:
    recording.alloc_gate = threading.Event()
    async with PinnedPool(recording, max_bytes=64 * KB) as pool:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.allocate, 64 * KB)
                await wait_all_tasks_blocked()
                scope.cancel()
        assert pool.stats().reserved_bytes == 64 * KB  # the pin is still in flight
        recording.alloc_gate.set()
        await until(lambda: pool.stats().free_blocks == 1)
        s = pool.stats()
        assert (s.free_blocks, s.reserved_bytes, s.active_requests) == (1, 64 * KB, 0)


async def test_a_refused_pin_is_retried_after_releasing_idle_blocks(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording) as pool:
        (await pool.allocate(KB)).free()
        recording.fail_allocs = 1
        buf = await pool.allocate(8 * KB)
        s = pool.stats()
        assert (buf.capacity, s.free_blocks, s.num_host_free, s.reserved_bytes) == (
            8 * KB,
            0,
            1,
            8 * KB,
        )
        recording.fail_if = lambda size: True
        with pytest.raises(MemoryError):
            await pool.allocate(64 * KB)
        assert pool.stats().reserved_bytes == 8 * KB


async def test_a_refused_pin_wakes_the_next_waiter(recording: RecordingBackend) -> None:
    async with PinnedPool(recording, max_bytes=8 * KB) as pool, anyio.create_task_group() as tg:
        held = await pool.allocate(8 * KB)
        w = Waiters(pool, tg)
        recording.fail_if = lambda size: size == 8 * KB
        await w.add("a", 8 * KB)
        await w.add("b", 4 * KB)
        held.free()
        await wait_all_tasks_blocked()
        # "a" reused the returned block; nothing was refused yet
        assert w.served == ["a"]
        await pool.empty_cache()
        w.bufs["a"].free()
        await pool.empty_cache()  # nothing idle pinned: "b" grows
        await until(lambda: w.served == ["a", "b"])


# -- threads and loops ---------------------------------------------------------------------------
async def test_allocate_blocking_serves_plain_threads() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool:
        buf = await anyio.to_thread.run_sync(pool.allocate_blocking, 4 * KB)
        assert buf.capacity == 4 * KB
        with pytest.raises(RuntimeError, match="deadlock"):
            pool.allocate_blocking(10)

        def in_thread() -> PinnedBuffer:
            return pool.allocate_blocking(4 * KB, timeout=10)

        async with anyio.create_task_group() as tg:
            got: list[PinnedBuffer] = []

            async def waiter() -> None:
                got.append(await anyio.to_thread.run_sync(in_thread))

            tg.start_soon(waiter)
            await until(lambda: pool.stats().waiters == 1)
            await anyio.to_thread.run_sync(buf.free)
        assert got[0].capacity == 4 * KB


async def test_a_pool_refuses_other_loops() -> None:
    import asyncio

    async with PinnedPool("host") as pool:
        (await pool.allocate(10)).free()

        def other_loop() -> BaseException | None:
            async def use() -> None:
                await pool.allocate(10)

            try:
                asyncio.run(use())
            except BaseException as exc:
                return exc
            return None

        err = await anyio.to_thread.run_sync(other_loop)
        assert isinstance(err, RuntimeError) and "another event loop" in str(err)
        with pytest.raises(RuntimeError):
            await anyio.to_thread.run_sync(lambda: pool.allocate_nowait(10))


async def test_free_from_a_finalizer_on_another_thread() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(10)
        box = [buf]
        del buf
        await anyio.to_thread.run_sync(box.clear)  # the last reference dies on a worker thread
        await until(lambda: pool.stats().free_blocks == 1)


async def _storm(pool: PinnedPool, seed: int, tasks: int) -> None:
    import random

    from aiopinned import HostStream

    rng = random.Random(seed)
    cap = pool.max_bytes
    assert cap is not None
    streams = [HostStream() for _ in range(3)]
    sizes = [1, 100, KB, 3 * KB, 4 * KB, 10 * KB, 16 * KB, 33 * KB, 64 * KB]
    outcomes = {"ok": 0, "timeout": 0, "cancelled": 0}

    async def client(
        scope: anyio.CancelScope,
        nbytes: int,
        timeout: float | None,
        hold: int,
        stream: HostStream | None,
    ) -> None:
        with scope:
            try:
                buf = await pool.allocate(nbytes, timeout=timeout)
            except TimeoutError:
                outcomes["timeout"] += 1
                return
            try:
                buf.numpy()[:] = 1
                assert pool.stats().reserved_bytes <= cap
                for _ in range(hold):
                    await anyio.lowlevel.checkpoint()
                if stream is not None:
                    stream.launch(time.sleep, 0)
                    buf.record_stream(stream)
            finally:
                buf.free()
            outcomes["ok"] += 1
        if scope.cancelled_caught:
            outcomes["cancelled"] += 1

    async with anyio.create_task_group() as tg:
        scopes = []
        for _ in range(tasks):
            scope = anyio.CancelScope()
            scopes.append(scope)
            tg.start_soon(
                client,
                scope,
                rng.choice(sizes),
                rng.choice([None, None, None, 0.0005, 0.002, 0.01]),
                rng.randrange(4),
                rng.choice([None, None, *streams]),
            )
            if rng.random() < 0.3:
                await anyio.lowlevel.checkpoint()
            if rng.random() < 0.1:
                rng.choice(scopes).cancel()
    assert outcomes["ok"] > tasks // 4, outcomes
    for stream in streams:
        await pool.synchronize(stream)


@pytest.mark.parametrize("seed", [1, 2])
async def test_storm_of_mixed_sizes_timeouts_and_cancellations(seed: int) -> None:
    cap = 128 * KB
    async with PinnedPool("host", max_bytes=cap, rounding="pow2") as pool:
        await _storm(pool, seed, tasks=2000)
        s = pool.stats()
        assert (s.active_bytes, s.active_requests, s.waiters, s.pending_events) == (0, 0, 0, 0)
        assert s.peak_reserved_bytes <= cap
        # The whole cap can be allocated again, in any size: n bytes hold a pow2(n) block.
        for size in (cap, cap // 2, 40 * KB, 4 * KB, 3000, 100):
            block = 1 << (size - 1).bit_length()
            bufs = [await pool.allocate(size, timeout=5) for _ in range(cap // block)]
            assert pool.stats().reserved_bytes <= cap
            assert sum(b.capacity for b in bufs) == cap
            for b in bufs:
                b.free()


async def test_a_small_request_does_not_sit_in_a_big_idle_block_under_a_cap() -> None:
    async with PinnedPool("host", max_bytes=64 * KB) as pool:
        (await pool.allocate(64 * KB)).free()
        halves = [await pool.allocate(32 * KB, timeout=5) for _ in range(2)]
        assert [b.capacity for b in halves] == [32 * KB, 32 * KB]
        assert pool.stats().num_host_free == 1


async def test_a_stuck_stream_does_not_hold_back_another() -> None:
    from aiopinned import HostStream

    from .conftest import Gate

    async with PinnedPool("host") as pool:
        stuck, gate, fine = HostStream(), Gate(), HostStream()
        stuck.launch(gate)
        a, b = await pool.allocate(64), await pool.allocate(64)
        a.record_stream(stuck)
        a.free()  # the older event, on a stream that does not move
        b.record_stream(fine)
        b.free()
        await until(lambda: pool.stats().free_blocks == 1)
        assert pool.process_events() == 0 and pool.stats().pending_events == 1
        gate.open()
        await until(lambda: pool.stats().free_blocks == 2)


async def test_spinning_returns_blocks_without_the_watcher_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiopinned import HostStream, _events

    from .conftest import Gate

    # Silence the watcher threads: only the loop's polling can bring the block back.
    monkeypatch.setattr(_events.EventWatcher, "_on_synced", lambda self: None)
    async with (
        PinnedPool("host", max_bytes=4 * KB, spin_s=30) as pool,
        anyio.create_task_group() as tg,
    ):
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        held = await pool.allocate(4 * KB)
        w = Waiters(pool, tg)
        await w.add("a", 4 * KB)
        held.record_stream(stream)
        held.free()
        gate.open()
        await until(lambda: w.served == ["a"])


def test_spin_s_is_checked() -> None:
    with pytest.raises(TypeError):
        PinnedPool("host", spin_s="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PinnedPool("host", spin_s=-1)


async def test_by_default_blocks_are_fine_classes_and_small_requests_stay_out_of_big_blocks() -> (
    None
):
    async with PinnedPool("host") as pool:  # no cap
        a = await pool.allocate(40 * KB + 1)
        assert a.capacity == 48 * KB  # four classes per doubling, not 64 KiB
        big = await pool.allocate(256 * KB)
        big.free()
        small = await pool.allocate(33 * KB)  # would fit the idle 256 KiB block: must not take it
        assert small.capacity == 40 * KB and pool.stats().free_blocks == 1


def test_the_default_wastes_little_on_the_mixed_trace() -> None:
    """benchmarks/bench_waste.py's trace, shortened: the default rounding's waste and hit rate
    against the seed's powers of two (the benchmark prints the full trace's)."""
    from benchmarks import bench_waste

    steps = bench_waste.trace(1, 1500)
    waste, hits = anyio.run(bench_waste.run, steps, "fine", None)
    seed_waste, _ = anyio.run(bench_waste.run, steps, "pow2", None)
    assert waste <= 1.15 and hits >= 0.85 and seed_waste >= 1.5, (waste, hits, seed_waste)


async def test_the_hit_paths_keep_the_seeds_order_lowest_address_first() -> None:
    """A freed block goes back inline when its size has had idle blocks but has none now, else
    through ``FreeList.add``; either way ``allocate_nowait`` hands out the lowest address of the
    size first, and the idle bytes add up."""
    async with PinnedPool("host") as pool:
        bufs = [await pool.allocate(1 << 20) for _ in range(4)]
        ptrs = sorted(b.ptr for b in bufs)
        for _ in range(2):  # first round: the size is new; second: its list is there, empty
            for i in (2, 0, 3, 1):  # the first back goes inline (2nd round), the rest sorted
                next(b for b in bufs if b.ptr == ptrs[i]).free()
            assert pool.stats().cached_bytes == 4 * bufs[0].capacity
            bufs = [pool.allocate_nowait(1 << 20) for _ in range(4)]
            assert [b.ptr for b in bufs] == ptrs and pool.stats().cached_bytes == 0
        for b in bufs:
            b.free()
