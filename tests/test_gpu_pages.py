"""PinnedPages on a real GPU (marked ``gpu``; skipped where no CUDA device is usable): both ways,
batched and one call per page, exactly the bytes asked; pages wait for their copies."""

from __future__ import annotations

import pytest

from aiopinned import PinnedPages, PinnedPool

from .conftest import until

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.asyncio]
KB = 1024


@pytest.mark.parametrize("method", ["batch", "loop", "auto"])
async def test_pages_go_to_the_device_and_back(method: str) -> None:
    page = 64 * KB
    async with PinnedPool("cuda") as pool:
        pages = await PinnedPages.allocate(pool, 300, page)
        for i in range(300):
            pages[i].numpy()[:] = i % 251
        kv = torch.zeros((320, page), dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        slots = torch.randperm(320)[:300]
        ptrs = [kv.data_ptr() + int(s) * page for s in slots]
        assert pages.to_device(range(300), ptrs, stream, method=method) == 300 * page
        stream.synchronize()
        want = torch.tensor([i % 251 for i in range(300)], dtype=torch.uint8, device="cuda")
        assert torch.equal(kv[slots, 0], want) and torch.equal(kv[slots, -1], want)
        kv[slots] += 1
        torch.cuda.synchronize()
        pages.from_device(ptrs[::-1], list(range(300)), stream, nbytes=page // 2, method=method)
        stream.synchronize()
        back = [int(pages[i].numpy()[0]) for i in range(300)]
        assert back == [(299 - i) % 251 + 1 for i in range(300)]
        assert all(int(pages[i].numpy()[-1]) == i % 251 for i in range(300))  # (half a page)
        pages.free()


async def test_pages_freed_with_copies_in_flight_wait_for_them() -> None:
    async with PinnedPool("cuda") as pool:
        pages = await PinnedPages.allocate(pool, 4, 2 << 20)
        kv = torch.zeros((4, 2 << 20), dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            torch.cuda._sleep(200_000_000)  # the stream is busy for a while
        pages.to_device(range(4), [kv[i].data_ptr() for i in range(4)], stream)
        pages.free()
        assert pool.stats().free_blocks == 0 and pool.stats().pending_events == 4
        await until(lambda: pool.stats().free_blocks == 4)


async def test_a_capturing_stream_is_refused() -> None:
    async with PinnedPool("cuda") as pool:
        pages = await PinnedPages.allocate(pool, 2, 64 * KB)
        kv = torch.zeros((2, 64 * KB), dtype=torch.uint8, device="cuda")
        stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            with pytest.raises(ValueError, match="captured"):
                pages.to_device([0], [kv.data_ptr()], stream)
            kv.add_(1)
        pages.free()
