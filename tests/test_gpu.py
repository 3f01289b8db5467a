"""On a real GPU (marked ``gpu``; skipped where no CUDA device is usable)."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import subprocess
import sys
import time
import warnings

import pytest

from aiopinned import PinnedPool, set_cupy_pinned_allocator
from aiopinned._bench import copy_gbps

from .conftest import until

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio]


def _cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / start.elapsed_time(end)


async def test_caching_pinned_memory() -> None:
    """A port of PyTorch's test_caching_pinned_memory."""
    cycles_per_ms = _cycles_per_ms()
    async with PinnedPool("cuda") as pool:
        buf = await pool.allocate(4)
        ptr = buf.ptr
        buf.free()
        buf = await pool.allocate(4)
        assert buf.ptr == ptr, "allocation not reused"

        t = buf.torch(torch.float32)
        t.fill_(1.0)
        gpu = torch.zeros(1, device="cuda")
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(int(1000 * cycles_per_ms))  # delay the copy by 1 s
        gpu.copy_(t, non_blocking=True)
        assert buf.record_stream(stream)
        del t
        buf.free()
        other = await pool.allocate(4)
        assert other.ptr != ptr, "allocation re-used too soon"
        await pool.synchronize(stream)
        assert gpu.tolist() == [1.0]
        other.free()
        # after the copy completed, the block is handed out again
        got = {(await pool.allocate(4)).ptr, (await pool.allocate(4)).ptr}
        assert ptr in got


async def test_data_integrity_with_mixed_sizes_on_a_side_stream() -> None:
    rng = random.Random(1234)
    cycles_per_ms = _cycles_per_ms()
    side = torch.cuda.Stream()
    sizes = [1, 1000, 4096, 65536, 300_000, 1 << 20, 3 << 20]  # int32 elements
    outs = []
    async with PinnedPool("cuda") as pool:
        for i in range(500):
            n = rng.choice(sizes)
            buf = await pool.allocate(n * 4)
            host = buf.torch(torch.int32, n)
            host.fill_(i)
            dev = torch.empty(n, dtype=torch.int32, device="cuda")
            with torch.cuda.stream(side):
                if i % 50 == 0:  # hold the stream back so early reuse would show
                    torch.cuda._sleep(int(20 * cycles_per_ms))
                dev.copy_(host, non_blocking=True)
            assert buf.record_stream(side)
            del host
            buf.free()
            outs.append((i, dev))
            if i % 5 == 0:
                await asyncio.sleep(0)  # let the watcher hand blocks back
        await pool.synchronize(side)
        bad = [i for i, dev in outs if not bool((dev == i).all())]
        stats = pool.stats()
        print(
            f"\nintegrity: 500 copies, {stats.cache_hits} cache hits, "
            f"{stats.num_host_alloc} blocks pinned, {len(bad)} corrupted"
        )
        assert bad == []
        assert stats.cache_hits > 250


async def test_views_are_pinned_and_copy_at_pinned_bandwidth() -> None:
    n = 512 << 20
    async with PinnedPool("cuda") as pool:
        buf = await pool.allocate(n)
        src = buf.torch()
        assert src.is_pinned()
        ref = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(n, dtype=torch.uint8)
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")

        def gbps(t: object, reps: int = 5) -> float:
            return copy_gbps(torch, t, dst, True, reps)

        ours, theirs = max(gbps(src) for _ in range(3)), max(gbps(ref) for _ in range(3))
        slow = gbps(pageable, 2)
        print(
            f"\nH2D 512 MiB: aiopinned {ours:.1f} GB/s, torch pin_memory {theirs:.1f} GB/s, "
            f"pageable {slow:.1f} GB/s"
        )
        assert ours >= 0.9 * theirs
        del src
        buf.free()


async def test_streams_of_every_kind_are_accepted() -> None:
    from cuda.bindings import runtime as rt

    s = torch.cuda.Stream()
    kinds: list[object] = [None, 0, s, s.cuda_stream, torch.cuda.current_stream()]
    err, raw = rt.cudaStreamCreate()
    assert err == rt.cudaError_t.cudaSuccess
    kinds.append(raw)
    try:
        import cupy

        kinds.append(cupy.cuda.Stream(non_blocking=True))
    except ImportError:
        pass
    async with PinnedPool("cuda") as pool:
        for stream in kinds:
            buf = await pool.allocate(64)
            assert pool.record_stream(buf, stream), stream
            buf.free()
            await pool.synchronize(stream)
            assert pool.stats().pending_events == 0
        with pytest.raises(TypeError):
            pool.record_stream(await pool.allocate(8), "stream")
    assert rt.cudaStreamDestroy(raw)[0] == rt.cudaError_t.cudaSuccess


async def test_a_stuck_stream_does_not_hold_back_another() -> None:
    cycles_per_ms = _cycles_per_ms()
    slow, fast = torch.cuda.Stream(), torch.cuda.Stream()
    async with PinnedPool("cuda") as pool:
        a, b = await pool.allocate(64), await pool.allocate(64)
        with torch.cuda.stream(slow):
            torch.cuda._sleep(int(2000 * cycles_per_ms))
        a.record_stream(slow)
        a.free()  # its event is older, and stuck for 2 s
        b.record_stream(fast)
        b.free()
        await pool.synchronize(fast)
        await until(lambda: pool.stats().free_blocks == 1)
        assert pool.stats().pending_events == 1
        await pool.synchronize(slow)
        assert pool.stats().free_blocks == 2


async def test_cupy_takes_its_pinned_memory_from_the_pool() -> None:
    cupy = pytest.importorskip("cupy")
    async with PinnedPool("cuda") as pool:
        (await pool.allocate(1000)).free()  # warm: CuPy's allocator must not pin on the loop
        set_cupy_pinned_allocator(pool)
        try:
            mem = cupy.cuda.alloc_pinned_memory(1000)
            assert pool.stats().active_requests == 1
            assert pool.record_stream(mem.ptr, None)  # CuPy's pointer is the pool's memory
            with warnings.catch_warnings():
                warnings.simplefilter("error", ResourceWarning)  # freed, not merely collected
                del mem
                gc.collect()
            await until(lambda: pool.stats().active_requests == 0)
        finally:
            set_cupy_pinned_allocator(None)


async def test_a_capped_pool_feeding_a_copy_loop_reuses_one_block() -> None:
    n = 64 << 20
    stream = torch.cuda.Stream()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    ptrs = set()
    async with PinnedPool("cuda", max_bytes=n) as pool:
        for i in range(50):
            async with pool.buffer(n, timeout=30) as buf:  # waits for the last copy to finish
                buf.numpy()[:16] = i
                with torch.cuda.stream(stream):
                    dev.copy_(buf.torch(), non_blocking=True)
                buf.record_stream(stream)
                ptrs.add(buf.ptr)
        await pool.synchronize(stream)
        s = pool.stats()
        print(
            f"\ncapped copy loop: 50 x 64 MiB, {s.num_host_alloc} block pinned, "
            f"peak reserved {s.peak_reserved_bytes >> 20} MiB of {n >> 20} MiB"
        )
        assert len(ptrs) == 1 and s.num_host_alloc == 1
        assert s.peak_reserved_bytes <= n
        assert int(dev[0]) == 49


async def test_concurrent_producers_under_a_cap_never_pass_it() -> None:
    n, cap = 8 << 20, 24 << 20
    streams = [torch.cuda.Stream() for _ in range(4)]
    devs = [torch.empty(n // 4, dtype=torch.int32, device="cuda") for _ in range(4)]
    async with PinnedPool("cuda", max_bytes=cap) as pool:

        async def producer(k: int) -> None:
            for i in range(40):
                async with pool.buffer(n) as buf:
                    buf.torch(torch.int32).fill_(k * 1000 + i)
                    with torch.cuda.stream(streams[k]):
                        devs[k].copy_(buf.torch(torch.int32), non_blocking=True)
                    buf.record_stream(streams[k])
                    assert pool.stats().reserved_bytes <= cap
                await asyncio.sleep(0)

        await asyncio.gather(*(producer(k) for k in range(4)))
        for k, s in enumerate(streams):
            await pool.synchronize(s)
            assert bool((devs[k] == k * 1000 + 39).all())
        st = pool.stats()
        assert st.peak_reserved_bytes <= cap and st.active_requests == 0 and st.waiters == 0


async def test_events_are_recorded_on_each_streams_own_device() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    streams = [torch.cuda.Stream(device=d) for d in range(2)]
    devs = [torch.empty(1 << 20, dtype=torch.uint8, device=f"cuda:{d}") for d in range(2)]
    async with PinnedPool("cuda") as pool:
        torch.cuda.set_device(1)
        for _ in range(20):
            buf = await pool.allocate(1 << 20)
            for d in range(2):
                with torch.cuda.stream(streams[d]):
                    devs[d].copy_(buf.torch(), non_blocking=True)
                assert buf.record_stream(streams[d])
            assert buf.record_stream(None)  # the legacy stream of the current device (1)
            buf.free()
        torch.cuda.set_device(0)
        for s in streams:
            await pool.synchronize(s)
        await pool.synchronize(None)
        await until(lambda: pool.stats().pending_events == 0)
        assert pool.stats().free_blocks >= 1 and pool.stats().active_requests == 0


async def test_a_pool_per_device_pins_for_its_own_device() -> None:
    """One pool per device, each ``numa_node="auto"``: a block of each pool copies right to its
    own device and to the other one; a pool given no device serves the loop thread's."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    n = 8 << 20
    async with (
        PinnedPool("cuda", device=0, numa_node="auto") as p0,
        PinnedPool("cuda", device=1, numa_node="auto") as p1,
    ):
        assert (p0.device, p1.device) == (0, 1)
        for d, pool in enumerate((p0, p1)):
            buf = await pool.allocate(n)
            buf.torch().fill_(d + 7)
            for target in (d, 1 - d):
                stream = torch.cuda.Stream(device=target)
                with torch.cuda.stream(stream):
                    dev = buf.torch().to(f"cuda:{target}", non_blocking=True)
                assert buf.record_stream(stream)
                await pool.synchronize(stream)
                assert bool((dev == d + 7).all())
            buf.free()
    torch.cuda.set_device(1)
    try:
        async with PinnedPool("cuda") as pool:
            assert pool.device == 1
    finally:
        torch.cuda.set_device(0)


_ONE_DEVICE_WORKER = """
import asyncio
from cuda.bindings import driver as drv, runtime as rt

from aiopinned import PinnedPool

def ok(result):
    assert result[0] == rt.cudaError_t.cudaSuccess, result
    return result[1] if len(result) > 1 else None

async def main(copies):
    if not copies:  # device given, and no CUDA on this thread at all
        async with PinnedPool("cuda", device=1, numa_node="auto") as pool:
            for n in (4096, 64 << 20):
                (await pool.allocate(n)).free()
            await pool.empty_cache()
        return
    ok(rt.cudaSetDevice(1))  # as torch.cuda.set_device(1) leaves a worker's loop thread
    stream, dev = ok(rt.cudaStreamCreate()), ok(rt.cudaMalloc(64 << 20))
    async with PinnedPool("cuda", numa_node="auto") as pool:
        assert pool.device == 1, pool.device
        for n in (4096, 64 << 20, 64 << 20):  # events waited on by the watcher's threads
            buf = await pool.allocate(n)
            ok(rt.cudaMemcpyAsync(dev, buf.ptr, n, rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                  stream))
            assert buf.record_stream(int(stream))
            buf.free()
        await pool.synchronize(int(stream))
        await pool.empty_cache()

asyncio.run(main(COPIES))
states = [drv.cuDevicePrimaryCtxGetState(d) for d in range(2)]
assert all(s[0] == drv.CUresult.CUDA_SUCCESS for s in states), states
print([bool(s[2]) for s in states])
"""


@pytest.mark.parametrize("copies", [False, True])
async def test_a_worker_for_one_device_makes_no_context_on_another(copies: bool) -> None:
    """In a fresh process, a pool for device 1 (given, or the one the loop thread is on) pins,
    records events that the watcher's threads wait on, unpins and closes without ever making
    device 0's context (which would take GPU memory there, per process)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    run = [sys.executable, "-c", _ONE_DEVICE_WORKER.replace("COPIES", str(copies))]
    out = await asyncio.to_thread(
        subprocess.run, run, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[False, True]"


async def test_a_pool_opens_for_a_device_and_refuses_one_the_process_lacks() -> None:
    from aiopinned.backends._numa import placement

    async with PinnedPool("cuda", numa_node="auto") as pool:
        assert pool.device == torch.cuda.current_device()
        buf = await pool.allocate(4 << 20)
        node = pool._rt.backend.numa_node  # type: ignore[attr-defined]
        where = placement(buf.ptr)
        assert where is not None
        assert where[0] == ("default" if node is None else f"prefer:{node}")
        assert sum(where[1].values()) >= 4 << 20  # resident, on the nodes listed
        buf.free()
    with pytest.raises(ValueError, match="CUDA device"):
        async with PinnedPool("cuda", device=torch.cuda.device_count()):
            pass


SOAK_CYCLES = int(os.environ.get("AIOPINNED_SOAK_CYCLES", "5000"))


async def test_soak_reuse_cycles_never_corrupt_a_copy() -> None:
    """Fill, copy to the device on one of several streams, free with record_stream, check on
    the device: over and over under a tight cap, with some copies held back by kernels so that
    blocks are still being read when others want them.  ``AIOPINNED_SOAK_CYCLES`` sets the
    length (10^5 for the soak proper)."""
    cycles_per_ms = _cycles_per_ms()
    streams = [torch.cuda.Stream() for _ in range(4)]
    bad = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in streams]  # one per stream
    sizes = [4096, 65536, 1 << 20, 3 << 20]
    rng = random.Random(5)
    t0 = time.perf_counter()
    async with PinnedPool("cuda", max_bytes=16 << 20) as pool:
        for i in range(SOAK_CYCLES):
            k = rng.randrange(len(streams))
            buf = await pool.allocate(rng.choice(sizes), timeout=60)
            host = buf.torch()
            host.fill_(i % 251)
            with torch.cuda.stream(streams[k]):
                if i % 97 == 0:
                    torch.cuda._sleep(int(0.2 * cycles_per_ms))  # the copy waits 0.2 ms
                dev = host.to("cuda", non_blocking=True)
                bad[k] += (dev != i % 251).sum()
            del host
            buf.record_stream(streams[k])
            buf.free()
            if i % 16 == 0:
                await asyncio.sleep(0)
        torch.cuda.synchronize()
        corrupt = sum(int(b) for b in bad)
        s = pool.stats()
        print(
            f"\nsoak: {SOAK_CYCLES} cycles in {time.perf_counter() - t0:.1f} s, {corrupt} corrupt "
            f"copies, {s.num_host_alloc} blocks pinned, {s.cache_hits} cache hits, "
            f"{s.num_waits} waits, peak reserved {s.peak_reserved_bytes >> 20} MiB of 16"
        )
        assert corrupt == 0 and s.peak_reserved_bytes <= 16 << 20


async def test_blocks_keep_coming_back_while_one_stream_is_stuck_behind_a_long_kernel() -> None:
    cycles_per_ms = _cycles_per_ms()
    stuck, busy = torch.cuda.Stream(), torch.cuda.Stream()
    async with PinnedPool("cuda", max_bytes=8 << 20) as pool:
        held = await pool.allocate(4 << 20)
        with torch.cuda.stream(stuck):
            torch.cuda._sleep(int(8000 * cycles_per_ms))  # 8 s: far longer than the loop below
            dev_held = held.torch().to("cuda", non_blocking=True)
        held.record_stream(stuck)
        held.free()
        ptrs, t0 = set(), time.perf_counter()
        for i in range(300):  # all through the other half of the cap, while the kernel runs
            buf = await pool.allocate(4 << 20, timeout=10)  # (the held block would fit too)
            ptrs.add(buf.ptr)
            buf.torch().fill_(i % 251)
            with torch.cuda.stream(busy):
                buf.torch().to("cuda", non_blocking=True)
            buf.record_stream(busy)
            buf.free()
        elapsed = time.perf_counter() - t0
        assert not stuck.query() and elapsed < 8  # the kernel still runs...
        assert held.ptr not in ptrs and pool.stats().pending_events >= 1  # ...and holds its block
        await pool.synchronize(stuck)
        assert dev_held.numel() == 4 << 20
        await until(lambda: pool.stats().pending_events == 0)
        print(f"\nstuck stream: 300 cycles on another stream in {elapsed * 1e3:.0f} ms")


@pytest.mark.parametrize("pinning", ["auto", "register", "alloc"])
async def test_every_pinning_mode_gives_memory_that_is_pinned_and_copies_right(
    pinning: str,
) -> None:
    n = 64 << 20
    async with PinnedPool("cuda", pinning=pinning) as pool:
        buf = await pool.allocate(n)
        host = buf.torch()
        assert host.is_pinned()
        host.fill_(7)
        dev = host.to("cuda", non_blocking=True)
        back = (await pool.allocate(n)).torch()
        back.copy_(dev + 1, non_blocking=True)
        torch.cuda.synchronize()
        assert int(dev.sum()) == 7 * n and int(back.sum()) == 8 * n
        assert pool._rt.backend.pinning == pinning  # "auto" registered: it did not fall back
        del host, back


async def test_reserve_pins_ahead_and_the_first_requests_hit_the_cache() -> None:
    progress: list[int] = []
    async with PinnedPool("cuda", max_bytes=512 << 20) as pool:
        t0 = time.perf_counter()
        got = await pool.reserve(256 << 20, block_bytes=64 << 20,
                                 progress=lambda done, total: progress.append(done))  # fmt: skip
        elapsed = time.perf_counter() - t0
        assert got == 256 << 20 and progress == [256 << 20]  # one segment, four blocks
        buf = await pool.allocate(64 << 20)
        assert buf.torch().is_pinned() and pool.stats().cache_misses == 0
        print(f"\nreserve: 256 MiB in 4 blocks of one segment in {elapsed * 1e3:.0f} ms")


async def test_blocks_carved_from_a_segment_copy_at_full_speed_and_hold_their_bytes() -> None:
    async with PinnedPool("cuda", segment_bytes=256 << 20) as pool:
        await pool.reserve(512 << 20, block_bytes=2 << 20)  # two segments of 128 pages
        s = pool.stats()
        assert (s.num_host_alloc, s.segments, s.free_blocks) == (2, 2, 256)
        pages = [await pool.allocate(2 << 20) for _ in range(256)]
        dev = torch.empty((256, 2 << 20), dtype=torch.uint8, device="cuda")
        for i, page in enumerate(pages):
            page.numpy()[:] = i % 251
            dev[i].copy_(page.torch(), non_blocking=True)
            page.record_stream(torch.cuda.current_stream())
        torch.cuda.synchronize()
        assert all(int(dev[i, -1]) == i % 251 for i in range(256))
        big = torch.empty(2 << 20, dtype=torch.uint8, device="cuda")
        gbps = copy_gbps(torch, pages[7].torch(), big, True, 50)
        print(f"\na carved 2 MiB page, host to device: {gbps:.1f} GB/s")
        assert gbps > 20  # pinned (pageable runs at about 8)
        for page in pages:
            page.free()
        await pool.synchronize(torch.cuda.current_stream())
        assert await pool.empty_cache() == 512 << 20 and pool.stats().segments == 0


async def test_a_block_registered_in_chunks_copies_within_each_chunk() -> None:
    async with PinnedPool("cuda") as pool:
        pool_backend = pool._rt.backend
        pool_backend.register_chunk_bytes = 32 << 20  # (64 GiB in use: 32 MiB here)
        buf = await pool.allocate(96 << 20)
        host = buf.torch()
        host[:] = 3
        dev = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
        for k in range(3):  # each chunk of it, a registration of its own
            dev.copy_(host[k << 25 : (k + 1) << 25], non_blocking=True)
            torch.cuda.synchronize()
            assert int(dev[-1]) == 3
        buf.free()
        await pool.empty_cache()


async def test_idle_pinned_memory_is_trimmed_by_age_and_by_bytes() -> None:
    async with PinnedPool("cuda", idle_timeout_s=0.05, max_idle_bytes=64 << 20) as pool:
        bufs = [await pool.allocate(64 << 20) for _ in range(2)]
        for buf in bufs:
            buf.free()  # the second return puts 128 MiB idle: the oldest is trimmed at once
        await until(lambda: pool.stats().reserved_bytes == 0)  # and the other once it ages
        assert pool.stats().trimmed_bytes == 128 << 20
