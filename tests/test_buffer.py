"""PinnedBuffer: views, and views keeping the memory alive."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from aiopinned import HostStream, InvalidBufferError, PinnedPool

from .conftest import Gate, settle, until

pytestmark = pytest.mark.anyio


async def test_memoryview_is_writable_and_nbytes_long() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(1000)
        mv = buf.memoryview()
        assert (len(mv), mv.format, mv.readonly) == (1000, "B", False)
        mv[:3] = b"abc"
        assert bytes(buf.memoryview()[:3]) == b"abc"


async def test_numpy_views_take_dtype_and_shape() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(4096)
        flat = buf.numpy()
        assert (flat.dtype, flat.shape) == (np.uint8, (4096,))
        grid = buf.numpy(np.float32, (16, 64))
        grid[:] = 2.5
        assert buf.numpy(np.float32)[1023] == 2.5
        assert buf.numpy(np.float64, 10).shape == (10,)
        with pytest.raises(ValueError):
            buf.numpy(np.float32, (32, 64))  # more than nbytes
        with pytest.raises(ValueError):
            (await pool.allocate(10)).numpy(np.float32)  # 10 bytes is not whole float32s
        with pytest.raises(ValueError):
            buf.numpy(shape=(-1,))


async def test_torch_views_share_the_memory() -> None:
    torch = pytest.importorskip("torch")
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(64)
        t = buf.torch(torch.float32, (4, 4))
        t.fill_(3.0)
        assert buf.numpy(np.float32).tolist() == [3.0] * 16
        assert t.data_ptr() == buf.ptr
        assert buf.torch().dtype == torch.uint8 and buf.torch().numel() == 64
        with pytest.raises(TypeError):
            buf.torch(np.float32)
        assert (await pool.allocate(0)).torch().numel() == 0


async def test_free_while_a_view_is_referenced_defers_the_return() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(256)
        view = buf.numpy()
        buf.free()
        assert pool.stats().free_blocks == 0 and pool.stats().active_requests == 1
        other = await pool.allocate(256)
        assert other.ptr != buf.ptr  # the view still owns the memory
        view[:] = 9  # still valid memory
        del view
        gc.collect()
        await until(lambda: pool.stats().free_blocks == 1)
        assert pool.stats().active_requests == 1  # only `other`


async def test_every_kind_of_view_keeps_the_block() -> None:
    torch = pytest.importorskip("torch")
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(256)
        views = [buf.memoryview()[10:], buf.numpy()[5:], buf.torch(torch.int32)[2:]]
        buf.free()
        while len(views) > 1:
            views.pop()
            gc.collect()
            await settle()
            assert pool.stats().free_blocks == 0
        views.pop()
        gc.collect()
        await until(lambda: pool.stats().free_blocks == 1)


async def test_a_deferred_block_still_waits_for_its_streams() -> None:
    async with PinnedPool("host") as pool:
        stream, gate = HostStream(), Gate()
        stream.launch(gate)
        buf = await pool.allocate(256)
        view = buf.numpy()
        buf.free()
        assert pool.record_stream(view, stream)  # a view may still be used on a stream
        del view
        gc.collect()
        await until(lambda: pool.stats().pending_events == 1)
        assert pool.stats().free_blocks == 0
        gate.open()
        await until(lambda: pool.stats().free_blocks == 1)


async def test_no_new_view_after_free() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(16)
        buf.free()
        for make in (buf.memoryview, buf.numpy):
            with pytest.raises(InvalidBufferError):
                make()
        assert buf.freed and "freed" in repr(buf)


async def test_views_made_before_and_after_a_dead_view_both_count() -> None:
    async with PinnedPool("host") as pool:
        buf = await pool.allocate(32)
        first = buf.numpy()
        del first
        gc.collect()
        second = buf.memoryview()
        buf.free()
        await settle()
        assert pool.stats().free_blocks == 0
        del second
        gc.collect()
        await until(lambda: pool.stats().free_blocks == 1)
