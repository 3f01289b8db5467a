"""CUDA graph capture on a real GPU (marked ``gpu``; skipped where no CUDA device is usable): a
buffer that a captured copy reads is kept for the graph's lifetime, and the pool's own threads
never break a capture that someone else runs in the global mode (torch.cuda.graph's default)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from aiopinned import PinnedPool

from .conftest import until
from .test_gpu import _cycles_per_ms

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio]
MiB = 1 << 20


def _idle(pool: PinnedPool) -> set[int]:
    return {b.ptr for b in pool._cache.free.blocks()}


async def test_a_captured_copy_replayed_after_free_reads_the_buffer_it_captured() -> None:
    cycles_per_ms, n = _cycles_per_ms(), 4 * MiB
    expected = torch.arange(n // 4, dtype=torch.int32)
    async with PinnedPool("cuda") as pool:
        buf = await pool.allocate(n)
        ptr = buf.ptr
        host = buf.torch(torch.int32)
        host.copy_(expected)
        dev = torch.zeros(n // 4, dtype=torch.int32, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dev.copy_(host, non_blocking=True)
            assert buf.record_stream(torch.cuda.current_stream())  # the capturing stream
        del host
        buf.free()
        # The block stays out of the cache: new buffers of its size are other blocks, and what
        # is written into them never reaches the graph's copy.
        others = [await pool.allocate(n) for _ in range(3)]
        assert ptr not in {o.ptr for o in others}
        for other in others:
            other.torch(torch.int32).fill_(-1)
        for _ in range(5):
            dev.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(dev.cpu(), expected)
        for other in others:
            other.free()
        assert ptr not in _idle(pool)
        # Destroyed while a replay is still queued behind a 300 ms kernel: the block comes back
        # only after that replay has run.
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(int(300 * cycles_per_ms))
        dev.zero_()
        graph.replay()
        del graph
        gc.collect()
        while not stream.query():
            assert ptr not in _idle(pool)
            await asyncio.sleep(0.005)
        assert torch.equal(dev.cpu(), expected)
        await until(lambda: ptr in _idle(pool))


async def test_a_buffer_freed_during_a_capture_waits_for_that_graph() -> None:
    n = MiB
    async with PinnedPool("cuda") as pool:
        side = torch.cuda.Stream()
        buf = await pool.allocate(n)
        ptr, host = buf.ptr, buf.torch()
        host.fill_(7)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            buf.record_stream(side)  # (recorded on the stream that now captures)
            dev.copy_(host, non_blocking=True)
            del host
            buf.free()  # during the capture: no event may be recorded or queried
        assert pool.stats().pending_events == 0 and ptr not in _idle(pool)
        graph.replay()
        torch.cuda.synchronize()
        assert int(dev.min()) == int(dev.max()) == 7
        del graph
        gc.collect()
        await until(lambda: ptr in _idle(pool))


async def test_a_capture_in_the_global_mode_survives_a_busy_pool() -> None:
    """Blocks come back (events queried and waited on) and new ones are pinned in the background
    while the loop's own thread captures a graph in the global mode, awaiting in the middle of
    it: the capture must succeed and its replays be right."""
    cycles_per_ms, n = _cycles_per_ms(), 1 << 22
    async with PinnedPool("cuda") as pool:
        side = torch.cuda.Stream()
        reserving = asyncio.ensure_future(pool.reserve(512 * MiB, block_bytes=16 * MiB))
        x = torch.arange(n, dtype=torch.float32, device="cuda")
        y = torch.empty_like(x)
        y.copy_(x * 2 + 1)  # (warm-up, outside the capture)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # capture_error_mode="global"
            y.copy_(x * 2 + 1)
            with torch.cuda.stream(side):  # (not capturing) work whose events end mid-capture
                torch.cuda._sleep(int(100 * cycles_per_ms))
            for _ in range(8):
                buf = await pool.allocate(MiB)
                buf.record_stream(side)
                buf.free()
            assert pool.stats().pending_events == 8
            await asyncio.sleep(0.4)  # helpers wait, the loop polls, reserve pins meanwhile
            got = await pool.allocate(3 * MiB)  # a new block, pinned during the capture
            y.mul_(3)
        got.free()
        assert await reserving == 512 * MiB
        await until(lambda: pool.stats().pending_events == 0)
        for k in range(3):
            x.fill_(k)
            graph.replay()
            torch.cuda.synchronize()
            assert float(y.min()) == float(y.max()) == (k * 2 + 1) * 3
