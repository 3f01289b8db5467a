"""The defects found by attacking the pool (model-based fuzzing, faults, storms, bad input), one
regression test each: liveness, blocks lost or the cap broken under backend faults, shutdown,
memory safety once the loop has ended, threads and loops, and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import anyio
import numpy as np
import pytest
from anyio import wait_all_tasks_blocked

from aiopinned import CudaError, HostStream, PinnedBuffer, PinnedPool, PoolClosed

from .conftest import Gate, RecordingBackend, settle, until
from .faults import FaultBackend

pytestmark = pytest.mark.anyio
KB = 1024


def consistent(pool: PinnedPool, backend: FaultBackend) -> None:
    """The pool's counts match what the backend really has pinned, and nothing is stuck."""
    s = pool.stats()
    assert s.reserved_bytes == backend.pinned_bytes(), (s, backend.pinned_bytes())
    assert s.max_bytes is None or s.reserved_bytes <= s.max_bytes
    assert s.waiters == 0 and s.pending_events == 0


# -- liveness -------------------------------------------------------------------------------------
async def test_growth_that_unpins_a_bigger_victim_serves_the_waiter_behind_it(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording, max_bytes=64 * KB) as pool, anyio.create_task_group() as tg:
        (await pool.allocate(64 * KB)).free()  # one idle 64 KiB block
        recording.alloc_gate = threading.Event()
        got: dict[str, PinnedBuffer] = {}

        async def take(name: str, n: int) -> None:
            got[name] = await pool.allocate(n)

        tg.start_soon(take, "a", 16 * KB)  # unpins the 64 KiB block, pins 16 KiB (held)
        await wait_all_tasks_blocked()
        tg.start_soon(take, "b", 32 * KB)  # nothing idle, no room while "a" is in flight
        await wait_all_tasks_blocked()
        assert pool.stats().waiters == 1
        recording.alloc_gate.set()  # "a" settles with 48 KiB of room: "b" must be served
        await until(lambda: "b" in got)
        assert pool.stats().reserved_bytes == 48 * KB


# -- faults: nothing lost, the cap kept ----------------------------------------------------------
async def test_a_failed_event_record_raises_but_the_block_still_comes_back() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, max_bytes=4 * KB) as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        buf = await pool.allocate(4 * KB)
        buf.record_stream(stream)
        backend.fail_at["record"] = {backend.calls["record"] + 1}
        with pytest.raises(CudaError, match="record"):
            buf.free()
        assert buf.freed and pool.stats().free_blocks == 0  # the copy may still read it
        with pytest.raises(TimeoutError):
            await pool.allocate(4 * KB, timeout=0)
        gate.open()
        again = await pool.allocate(4 * KB, timeout=30)  # back once the stream has run
        assert again.ptr == buf.ptr
        again.free()
        consistent(pool, backend)


async def test_a_failing_event_release_loses_no_block() -> None:
    backend = FaultBackend()
    backend.fail_at["release_event"] = {1, 2}
    async with PinnedPool(backend, max_bytes=4 * KB) as pool:
        stream = HostStream()
        buf = await pool.allocate(4 * KB)
        buf.record_stream(stream)
        buf.free()
        # (the block may come back by the loop's poll before the helper lets go of the event)
        await until(lambda: backend.failures["release_event"] >= 1)
        assert pool.stats().free_blocks == 1
        consistent(pool, backend)


async def test_failing_queries_and_waits_fall_back_to_the_stream() -> None:
    backend = FaultBackend(rate=1.0, random_ops=("query", "synchronize"))
    async with PinnedPool(backend) as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        buf = await pool.allocate(KB)
        buf.record_stream(stream)
        buf.free()
        assert pool.process_events() == 0  # a failing query is "not known to be done"
        await settle()
        assert pool.stats().free_blocks == 0  # the helper waits on the stream instead
        gate.open()
        await until(lambda: pool.stats().free_blocks == 1)
        consistent(pool, backend)


async def test_an_unpin_that_fails_leaves_the_block_cached_and_counted() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend) as pool:
        for n in (KB, 2 * KB, 4 * KB):
            (await pool.allocate(n)).free()
        backend.fail_at["free"] = {2}
        with pytest.raises(CudaError, match="free"):
            await pool.empty_cache()
        s = pool.stats()
        assert (s.free_blocks, s.num_host_free) == (1, 2)  # the others were unpinned all the same
        consistent(pool, backend)
        assert await pool.empty_cache() == s.free_bytes  # and a second try unpins it
        consistent(pool, backend)


async def test_a_victim_that_fails_to_unpin_does_not_let_growth_pass_the_cap() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend, max_bytes=64 * KB) as pool:
        small = [await pool.allocate(16 * KB) for _ in range(4)]
        for buf in small:
            buf.free()
        backend.fail_at["free"] = {backend.calls["free"] + 2}
        with pytest.raises(CudaError, match="free"):
            await pool.allocate(64 * KB)  # must unpin all four; one refuses: nothing is pinned
        consistent(pool, backend)
        assert pool.stats().free_blocks == 1  # the victim still pinned is cached again
        big = await pool.allocate(48 * KB)  # room: 48 KiB, and the cap holds
        assert big.capacity == 48 * KB
        consistent(pool, backend)
        assert pool.stats().peak_reserved_bytes <= 64 * KB


async def test_an_out_of_memory_pin_is_retried_after_unpinning_idle_blocks() -> None:
    backend = FaultBackend()
    async with PinnedPool(backend) as pool:
        (await pool.allocate(KB)).free()
        backend.fail_at["alloc"] = {backend.calls["alloc"] + 1}
        buf = await pool.allocate(8 * KB)
        assert (buf.capacity, pool.stats().free_blocks, backend.failures["alloc"]) == (8 * KB, 0, 1)
        buf.free()
        consistent(pool, backend)


@pytest.mark.parametrize("seed", range(3))
async def test_random_faults_raise_only_documented_errors_and_keep_the_counts(seed: int) -> None:
    import random

    rng = random.Random(seed)
    ops = ("alloc", "free", "record", "query", "synchronize", "release_event")
    backend = FaultBackend(seed=seed, rate=0.05, random_ops=ops)
    streams = [HostStream() for _ in range(3)]
    documented = (CudaError, MemoryError, TimeoutError)
    errors = 0
    pool = PinnedPool(backend, max_bytes=256 * KB)
    async with contextlib.AsyncExitStack() as stack:
        await pool.open()
        stack.push_async_callback(close_documented, pool)
        live: list[PinnedBuffer] = []
        for _ in range(600):
            try:
                if live and rng.random() < 0.45:
                    buf = live.pop(rng.randrange(len(live)))
                    if rng.random() < 0.5:
                        buf.record_stream(rng.choice(streams))
                    buf.free()
                elif rng.random() < 0.05:
                    await pool.empty_cache()
                else:
                    live.append(await pool.allocate(rng.choice([1, KB, 5 * KB, 32 * KB]),
                                                    timeout=0))  # fmt: skip
            except documented:
                errors += 1
        for buf in live:
            try:
                buf.free()
            except CudaError:
                errors += 1
        for stream in streams:
            await anyio.to_thread.run_sync(stream.synchronize)
        await until(lambda: pool.stats().pending_events == 0)
        assert sum(backend.failures.values()) > 0 and errors > 0
        assert pool.stats().active_bytes == 0
        # Unpins may still be running in a thread (a block whose event could not be recorded goes
        # once its stream is done); until a thread is back the pool still counts its blocks, so
        # the cap never undercounts.
        assert pool.stats().reserved_bytes >= backend.pinned_bytes()
        await until(lambda: pool.stats().reserved_bytes == backend.pinned_bytes())
        consistent(pool, backend)
    assert backend.pinned_bytes() == pool.stats().reserved_bytes


async def close_documented(pool: PinnedPool) -> None:
    """Close; an unpin refused at close is reported as the backend's error, and nothing else."""
    with contextlib.suppress(CudaError):
        await pool.aclose()
    assert pool.closed


# -- shutdown -------------------------------------------------------------------------------------
async def test_close_finishes_when_waiting_on_events_fails() -> None:
    backend = FaultBackend(rate=1.0, random_ops=("synchronize", "query"))
    pool = PinnedPool(backend)
    async with pool:
        stream = HostStream()
        (await pool.allocate(KB)).free()
        buf = await pool.allocate(2 * KB)
        buf.record_stream(stream)
        buf.free()
    assert pool.closed and backend.pinned_bytes() == 0 and pool.stats().reserved_bytes == 0


async def test_a_close_cancelled_on_a_stuck_stream_can_be_retried() -> None:
    backend = FaultBackend()
    pool = PinnedPool(backend)
    await pool.open()
    stream, gate = HostStream(), Gate()
    stream.launch(gate)
    (await pool.allocate(KB)).free()
    buf = await pool.allocate(2 * KB)
    buf.record_stream(stream)
    buf.free()
    with anyio.move_on_after(0) as scope:  # the stream is stuck: give up on closing now
        await pool.aclose()
    assert scope.cancelled_caught and pool.closed
    gate.open()
    await pool.aclose()  # goes on where it stopped
    assert backend.pinned_bytes() == 0 and pool.stats().reserved_bytes == 0


async def test_close_unpins_what_it_can_and_raises_the_first_failure() -> None:
    backend = FaultBackend()
    pool = PinnedPool(backend)
    await pool.open()
    for n in (KB, 2 * KB, 4 * KB):
        (await pool.allocate(n)).free()
    backend.fail_at["free"] = {1}
    with pytest.raises(CudaError):
        await pool.aclose()
    assert pool.closed and pool.stats().reserved_bytes == backend.pinned_bytes() == KB
    await pool.aclose()  # closed: nothing more to do


@pytest.mark.usefixtures("asyncio_only")
async def test_a_growth_plan_cancelled_after_close_unpins_its_victims() -> None:
    backend = FaultBackend()
    pool = PinnedPool(backend, max_bytes=64 * KB)
    await pool.open()
    held = await pool.allocate(32 * KB)
    (await pool.allocate(32 * KB)).free()  # idle
    waiter = asyncio.ensure_future(pool.allocate(64 * KB))
    await wait_all_tasks_blocked()
    held.free()  # both blocks become the waiter's victims: a plan is granted, not yet run
    await pool.aclose()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await until(lambda: backend.pinned_bytes() == 0)
    s = pool.stats()
    assert (s.free_blocks, s.reserved_bytes) == (0, 0)


# -- after the loop has ended ---------------------------------------------------------------------
def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as a script (a file, so that tracebacks can show its lines)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, "-W", "always", str(script)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


KEEP_PAST_THE_POOL = {
    True: """
        async def main():
            async with aiopinned.PinnedPool(backend="host") as pool:
                keep.append(await pool.allocate(1 << 20))
                (await pool.allocate(1 << 16)).free()
        """,
    False: """
        async def main():
            pool = aiopinned.PinnedPool(backend="host")
            await pool.open()
            keep.append(pool)
            keep.append(await pool.allocate(1 << 20))
            (await pool.allocate(1 << 16)).free()
        """,
}


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "never-closed"])
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
def test_a_buffer_kept_past_its_pool_does_not_hang_the_exit(
    closed: bool, loop: str, tmp_path: Path
) -> None:
    """The issue's snippet: the finalizers at interpreter exit start no thread, and wait for
    nothing; the memory is left to the process's end."""
    pytest.importorskip(loop)
    code = textwrap.dedent(KEEP_PAST_THE_POOL[closed]) + textwrap.dedent(f"""
        anyio.run(main, backend="{loop}")
        print("exiting", flush=True)
        """)  # fmt: skip
    out = run_python("import anyio, aiopinned\nkeep = []\n" + code, tmp_path)
    assert out.returncode == 0 and out.stdout == "exiting\n", out.stderr
    assert "PinnedBuffer of 1048576 bytes was never freed" in out.stderr
    assert ("unclosed <PinnedPool" in out.stderr) is not closed


def test_an_unfreed_buffer_warns_where_it_was_allocated_under_tracemalloc(tmp_path: Path) -> None:
    out = run_python("""
        import asyncio, gc, tracemalloc, aiopinned
        tracemalloc.start(16)
        async def main():
            async with aiopinned.PinnedPool(backend="host") as pool:
                lost = await pool.allocate(3000)  # this line is named in the warning
                del lost
                gc.collect()
                await asyncio.sleep(0)
                assert pool.stats().free_blocks == 1  # and it was freed all the same
        asyncio.run(main())
        """, tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "PinnedBuffer of 3000 bytes was never freed" in out.stderr
    assert "Object allocated at" in out.stderr and "lost = await pool.allocate" in out.stderr


def test_memory_stays_mapped_under_views_once_the_loop_has_ended(tmp_path: Path) -> None:
    out = run_python("""
        import asyncio, threading, gc, aiopinned
        keep = {}
        async def main():
            async with aiopinned.PinnedPool(backend="host") as pool:
                never_freed = await pool.allocate(4096)
                keep["never"], keep["never_view"] = never_freed, never_freed.memoryview()
                freed_later = await pool.allocate(4096)
                keep["later"], keep["later_view"] = freed_later, freed_later.memoryview()
        asyncio.run(main())
        del keep["never_view"]; gc.collect()    # the last view of a live buffer dies
        keep["never"].memoryview()[:] = b"x" * 4096  # still its memory: writable
        t = threading.Thread(target=keep["later"].free); t.start(); t.join()
        keep["later_view"][:] = b"y" * 4096          # freed, but a view still holds it
        print(bytes(keep["later_view"][:2]).decode(), flush=True)
        """, tmp_path)  # fmt: skip
    assert out.returncode == 0 and out.stdout == "yy\n", out.stderr


async def test_copy_data_refuses_addresses_past_the_address_space() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(16)
        for dest, src in (
            (1 << 64, buf.ptr),
            (buf.ptr, (1 << 64) + buf.ptr),
            ((1 << 64) - 8, buf.ptr),
        ):
            with pytest.raises(ValueError, match="address space"):
                pool.copy_data(dest, src, 16)


# -- threads and loops ----------------------------------------------------------------------------
async def test_allocate_blocking_keeps_its_timeout_while_the_loop_is_held() -> None:
    async with PinnedPool("host", max_bytes=4 * KB) as pool:
        (await pool.allocate(4 * KB)).free()
        outcome: list[object] = []

        def in_thread() -> None:
            try:
                outcome.append(pool.allocate_blocking(4 * KB, timeout=0.01))
            except TimeoutError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join(30)  # the loop thread is held right here: nothing runs on it meanwhile
        assert isinstance(outcome[0], TimeoutError)
        await settle()
        assert pool.stats().active_requests == 0 and pool.stats().free_blocks == 1


def test_allocate_blocking_on_a_pool_whose_loop_has_ended_raises_at_once() -> None:
    pools: list[PinnedPool] = []

    async def main() -> None:
        pool = PinnedPool("host")
        await pool.open()
        pools.append(pool)

    asyncio.run(main())
    with pytest.raises(PoolClosed, match="loop"):
        pools[0].allocate_blocking(10, timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        pools.clear()
        gc.collect()


async def test_calls_from_another_thread_or_loop_are_refused_consistently() -> None:
    async with PinnedPool("host") as pool:
        stream = HostStream()
        buf = await pool.allocate(64)
        calls = {
            "allocate": lambda: pool.allocate(8),
            "buffer": lambda: pool.buffer(8).__aenter__(),
            "synchronize": lambda: pool.synchronize(stream),
            "empty_cache": lambda: pool.empty_cache(),
            "aclose": lambda: pool.aclose(),
        }
        sync_calls = {
            "allocate_nowait": lambda: pool.allocate_nowait(8),
            "process_events": lambda: pool.process_events(),
        }

        def other_thread() -> dict[str, str]:
            seen = {}

            async def each() -> None:
                for name, call in calls.items():
                    try:
                        await call()
                        seen[name] = "ran"
                    except RuntimeError:
                        seen[name] = "refused"

            for name, call in sync_calls.items():
                try:
                    call()
                    seen[name] = "ran"
                except RuntimeError:
                    seen[name] = "refused"
            asyncio.run(each())
            return seen

        seen = await anyio.to_thread.run_sync(other_thread)
        assert seen == dict.fromkeys([*sync_calls, *calls], "refused")
        # What is meant for other threads works there: record_stream, free, allocate_blocking.
        assert await anyio.to_thread.run_sync(buf.record_stream, stream)
        await anyio.to_thread.run_sync(buf.free)
        await pool.synchronize(stream)
        await until(lambda: pool.stats().free_blocks == 1)
        got = await anyio.to_thread.run_sync(lambda: pool.allocate_blocking(64, timeout=30))
        assert got.ptr == buf.ptr


async def test_record_stream_takes_the_value_of_a_numpy_integer_address() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(64)
        assert pool.record_stream(np.int64(buf.ptr), HostStream())
        assert not pool.record_stream(np.uint64(12345), HostStream())


async def test_a_huge_timeout_is_a_value_error_and_a_zero_byte_buffer_reports_freed() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(ValueError, match="too large"):
            await pool.allocate(10, timeout=2**1024)
        empty = await pool.allocate(0)
        empty.free()
        assert empty.freed


def test_a_pool_collected_while_open_warns_and_unpins_its_idle_blocks() -> None:
    backend = FaultBackend()

    async def main() -> None:
        pool = PinnedPool(backend)
        await pool.open()
        (await pool.allocate(KB)).free()

    asyncio.run(main())
    with pytest.warns(ResourceWarning, match="unclosed <PinnedPool"):
        gc.collect()
    deadline = threading.Event()
    for _ in range(3000):
        if backend.pinned_bytes() == 0:
            break
        deadline.wait(0.01)
    assert backend.pinned_bytes() == 0


# -- scrub on reuse -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [3000, 4 << 20], ids=["inline", "off-the-loop"])
async def test_scrub_zeroes_a_block_before_its_next_owner_gets_it(size: int) -> None:
    async with PinnedPool("host", max_bytes=4 << 20, scrub=True) as pool:
        first = await pool.allocate(size)
        ptr, capacity = first.ptr, first.capacity
        first.numpy()[:] = 0xAB  # one tenant's data...
        first.free()
        second = await pool.allocate(size, timeout=30)  # (the cap makes it wait for the block)
        assert second.ptr == ptr
        assert ctypes.string_at(second.ptr, capacity) == bytes(capacity)  # ...never the next's
        second.free()


async def test_scrub_waits_for_the_streams_then_zeroes(recording: RecordingBackend) -> None:
    async with PinnedPool("host", scrub=True) as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        buf = await pool.allocate(4 << 20)
        ctypes.memset(buf.ptr, 7, buf.capacity)
        buf.record_stream(stream)
        buf.free()
        await settle()
        assert ctypes.string_at(buf.ptr, 16) == b"\x07" * 16  # the copy may still read it
        gate.open()
        await until(lambda: pool.stats().free_blocks == 1)
        assert ctypes.string_at(buf.ptr, buf.capacity) == bytes(buf.capacity)


async def test_without_scrub_a_reused_block_keeps_its_bytes() -> None:
    """What scrub is for: the seed's allocator hands the last owner's bytes to the next."""
    async with PinnedPool("host") as pool:
        first = await pool.allocate(4096)
        ctypes.memset(first.ptr, 0xAB, 4096)
        first.free()
        assert ctypes.string_at((await pool.allocate(4096)).ptr, 4) == b"\xab" * 4


def test_scrub_must_be_a_bool() -> None:
    with pytest.raises(TypeError):
        PinnedPool("host", scrub=1)  # type: ignore[arg-type]
