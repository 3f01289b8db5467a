"""What a fault/fuzz pass over reserve, trimming, scrub, stats and metrics found, each reproduced
deterministically (issue 19), and the errors a new user meets first."""

from __future__ import annotations

import gc
import os
import sys
import threading
import warnings
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aiopinned import PinnedMemoryError, PinnedPool, PoolClosed
from aiopinned._loopport import LoopPort

from .conftest import RecordingBackend, until
from .faults import FaultBackend

pytestmark = pytest.mark.anyio
KB = 1024


# -- closing while pins run ------------------------------------------------------------------
async def test_aclose_waits_for_reserve_which_stops_pinning_into_the_closed_pool(
    recording: RecordingBackend,
) -> None:
    pool = await PinnedPool(recording).open()
    recording.alloc_gate = threading.Event()  # the first pin is held
    outcome: list[object] = []
    closed_with: list[int] = []

    async def reserve() -> None:
        try:
            outcome.append(await pool.reserve(256 * KB, block_bytes=64 * KB))
        except PoolClosed as exc:
            outcome.append(exc)

    async def close() -> None:
        await pool.aclose()
        closed_with.append(len(recording.alloc_threads))  # pins started when aclose returned

    async with anyio.create_task_group() as tg:
        tg.start_soon(reserve)
        await until(lambda: len(recording.alloc_threads) == 1)
        tg.start_soon(close)
        await anyio.wait_all_tasks_blocked()
        recording.alloc_gate.set()
    assert isinstance(outcome[0], PoolClosed)
    assert closed_with == [1] and len(recording.alloc_threads) == 1  # no pin after the close
    assert pool.stats().reserved_bytes == 0 and not recording._maps  # the one block: unpinned


async def test_an_out_of_memory_retry_hands_no_buffer_out_of_a_closing_pool(
    recording: RecordingBackend,
) -> None:
    pool = await PinnedPool(recording).open()
    (await pool.allocate(64 * KB)).free()  # an idle block: the retry would unpin it and pin again
    recording.alloc_gate, recording.fail_allocs = threading.Event(), 1
    outcome: list[object] = []

    async def allocate() -> None:
        try:
            outcome.append(await pool.allocate(256 * KB))
        except PoolClosed as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(allocate)
        await until(lambda: len(recording.alloc_threads) == 2)
        tg.start_soon(pool.aclose)
        await anyio.wait_all_tasks_blocked()
        recording.alloc_gate.set()
    assert isinstance(outcome[0], PoolClosed), outcome
    assert len(recording.alloc_threads) == 2 and not recording._maps


async def test_out_of_memory_during_reserve_unpins_no_idle_block(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording, segment_bytes=64 * KB) as pool:  # (a pin per block)
        (await pool.allocate(128 * KB)).free()  # the server's cached block
        pins = iter(range(100))
        recording.fail_if = lambda size: next(pins) >= 2  # the third of reserve's pins fails
        with pytest.raises(PinnedMemoryError, match=f"pinned {128 * KB} of {256 * KB} bytes"):
            await pool.reserve(256 * KB, block_bytes=64 * KB)
        s = pool.stats()
        assert (s.free_blocks, s.free_bytes, s.num_host_free) == (3, 256 * KB, 0)
        recording.fail_if = None


# -- trimming that cannot unpin --------------------------------------------------------------
async def test_a_failing_trim_backs_off_and_counts_nothing_trimmed() -> None:
    backend = FaultBackend(random_ops=("free",), rate=1.0)  # every unpin fails
    async with PinnedPool(backend, max_idle_bytes=0) as pool:
        (await pool.allocate(64 * KB)).free()
        await until(lambda: backend.failures["free"] == 1)
        await anyio.sleep(0.5)
        s = pool.stats()
        assert backend.calls["free"] == 1  # once, then no retry within the back-off (1 s)
        assert (s.trimmed_bytes, s.reserved_bytes, s.free_blocks) == (0, 64 * KB, 1)
        backend.rate = 0.0  # the unpin works again: it is tried after the back-off
        await until(lambda: pool.stats().trimmed_bytes == 64 * KB, timeout=5)
        assert backend.calls["free"] == 2 and pool.stats().reserved_bytes == 0


# -- a pool dropped after a large scrub ------------------------------------------------------
@pytest.mark.parametrize("thread_lags", [False, True])
async def test_a_pool_dropped_after_a_large_scrub_is_collected_and_warns(
    thread_lags: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if thread_lags:  # the scrubber thread is still inside its post when the pool is dropped
        lagging = threading.Event()
        post = LoopPort.post

        def slow_post(port: LoopPort, fn: Any, *args: object) -> bool:
            done = post(port, fn, *args)
            if getattr(fn, "__name__", "") == "_scrubbed":
                lagging.wait(10)
            return done

        monkeypatch.setattr(LoopPort, "post", slow_post)
    pool = await PinnedPool("host", scrub=True).open()
    (await pool.allocate(4 << 20)).free()  # zeroed in the scrubber thread
    await until(lambda p=pool: p.stats().free_blocks == 1)  # type: ignore[misc]
    gc.disable()  # (no collection but this test's: one at del would warn before pytest.warns)
    try:
        ref = weakref.ref(pool)
        del pool
        with pytest.warns(ResourceWarning, match="unclosed"):
            gc.collect()
    finally:
        gc.enable()
        if thread_lags:
            lagging.set()
    assert ref() is None


# -- stats from another thread: one instant --------------------------------------------------
async def test_stats_from_another_thread_is_one_instant() -> None:
    async with PinnedPool("host") as pool:
        bufs = [await pool.allocate(KB) for _ in range(8)]
        for buf in bufs:
            buf.free()
        torn: list[tuple[int, int, int]] = []
        done = threading.Event()

        def scrape() -> None:
            for _ in range(300):
                s = pool.stats()
                if s.active_bytes + s.cached_bytes > s.reserved_bytes:
                    torn.append((s.active_bytes, s.cached_bytes, s.reserved_bytes))
            done.set()

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threading.Thread(target=scrape, daemon=True).start()
            with anyio.fail_after(30):
                while not done.is_set():
                    held = [pool.allocate_nowait(KB) for _ in range(8)]
                    for buf in held:
                        buf.free()
                    await anyio.lowlevel.checkpoint()
        finally:
            sys.setswitchinterval(old)
        assert not torn


# -- first errors a new user meets -----------------------------------------------------------
async def test_a_request_beyond_the_machine_names_its_memory_not_a_cap() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(ValueError, match="this machine's memory") as info:
            await pool.allocate(2**80)
        assert "None" not in str(info.value)
        with pytest.raises(ValueError, match="this machine's memory"):
            pool.allocate_nowait(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + 1)


async def test_reserve_checks_progress_and_size_before_pinning(
    recording: RecordingBackend,
) -> None:
    async with PinnedPool(recording) as pool:
        with pytest.raises(TypeError, match="progress must be callable"):
            await pool.reserve(64 * KB, progress=42)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="this machine's memory"):
            await pool.reserve(2**64, block_bytes=2**20)
        assert not recording.alloc_threads


async def test_buffers_still_out_at_close_warn_and_so_does_a_late_free() -> None:
    pool = await PinnedPool("host").open()
    buf = await pool.allocate(KB)
    with pytest.warns(ResourceWarning, match=r"1 PinnedBuffer\(s\) of 1024 bytes were still out"):
        await pool.aclose()
    with pytest.warns(ResourceWarning, match="freed after its pool closed"):
        buf.free()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with PinnedPool("host") as quiet:  # everything freed in time: no warning
            (await quiet.allocate(KB)).free()
