"""PinnedBuffer: views, views keeping the memory alive, and the free / retire state machine.

The state machine is tested against a fake owner (the BlockOwner protocol) whose loop runs posted
calls only when the test says so, so every interleaving is chosen, not hoped for.
"""

from __future__ import annotations

import ctypes
import gc
import threading
from collections.abc import Callable

import numpy as np
import pytest

from aiopinned import HostStream, InvalidBufferError, PinnedBuffer, PinnedPool
from aiopinned._block import FREE, Block
from aiopinned._freelist import FreeList
from aiopinned._sizes import Sizes

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


# -- the state machine, against a fake owner -----------------------------------------------------
class FakeOwner:
    """A BlockOwner whose "loop" is a list of posted calls, run when the test says."""

    def __init__(self, *, on_loop_thread: bool = True, loop_alive: bool = True) -> None:
        self._thread_id = threading.get_ident() if on_loop_thread else -1
        self.loop_alive = loop_alive
        self.posted: list[Callable[[], object]] = []
        self.taken: list[Block] = []
        self.orphaned: list[Block] = []
        self._back: FreeList | None = None  # (all blocks to _take_back, unless a test sets it)
        self._waiters: list[object] = []

    def _call_on_loop(self, fn: Callable[[], object]) -> bool:
        if self.loop_alive:
            self.posted.append(fn)
        return self.loop_alive

    def run_loop(self) -> None:
        while self.posted:
            self.posted.pop(0)()

    def _take_back(self, block: Block) -> None:
        self.taken.append(block)

    def _orphaned(self, block: Block) -> None:
        self.orphaned.append(block)

    def _record(self, block: Block | None, stream: object) -> bool:
        return block is not None

    def _prepare_torch(self) -> None:
        pass


MEMORY = (ctypes.c_ubyte * 256)()


def fake_buffer(owner: FakeOwner) -> tuple[PinnedBuffer, Block]:
    block = Block(ctypes.addressof(MEMORY), 256)
    return PinnedBuffer(owner, block, 256), block


def test_free_on_the_loop_thread_hands_the_block_back_at_once() -> None:
    owner = FakeOwner()
    buf, block = fake_buffer(owner)
    buf.free()
    assert owner.taken == [block] and owner.posted == [] and buf.freed
    with pytest.raises(InvalidBufferError):
        buf.free()
    with pytest.raises(InvalidBufferError):
        buf.record_stream(None)


@pytest.mark.parametrize(
    "case", ["inline", "no back", "streams", "waiters", "never idle", "sibling"]
)
def test_free_puts_a_block_in_its_empty_home_itself_and_leaves_the_rest_to_the_owner(
    case: str,
) -> None:
    """The hit path's return: only a block with no streams, nobody waiting, and a home list with
    nothing in it (so the seed's address order holds) goes back without ``_take_back``."""
    owner, free = FakeOwner(), FreeList(Sizes("fine", capped=False))
    owner._back = None if case == "no back" else free
    block = Block(ctypes.addressof(MEMORY), 256)
    if case != "never idle":
        free.add(block)
        assert free.take(256) is block and block.home == []
    if case == "sibling":
        free.add(Block(ctypes.addressof(MEMORY) + 256, 256))
    buf = PinnedBuffer(owner, block, 256)
    if case == "streams":
        block.streams = {"s"}
    if case == "waiters":
        owner._waiters.append(object())
    buf.free()
    if case == "inline":
        assert owner.taken == [] and free.lists[256] == [block]
        assert (block.state, free.nbytes, free.take(256)) == (FREE, 256, block)
    else:
        assert owner.taken == [block] and block not in free.blocks()


def test_free_from_another_thread_hands_it_back_on_the_loop() -> None:
    owner = FakeOwner(on_loop_thread=False)
    buf, block = fake_buffer(owner)
    buf.free()
    assert owner.taken == [] and len(owner.posted) == 1
    owner.run_loop()
    assert owner.taken == [block]


def test_a_view_defers_the_hand_back_until_it_dies() -> None:
    owner = FakeOwner()
    buf, block = fake_buffer(owner)
    view = buf.memoryview()
    buf.free()
    owner.run_loop()
    assert owner.taken == []
    del view
    gc.collect()
    owner.run_loop()
    assert owner.taken == [block]


def test_free_from_a_thread_racing_the_last_view_hands_back_once() -> None:
    """free() from a thread posts a settle; the last view dies before it runs and posts one too:
    the block is handed back once (the race that gave two owners one address)."""
    owner = FakeOwner(on_loop_thread=False)
    buf, block = fake_buffer(owner)
    view = buf.numpy()
    buf.free()
    del view
    gc.collect()
    assert len(owner.posted) == 2
    owner.run_loop()
    assert owner.taken == [block]


def test_a_buffer_dropped_without_free_is_handed_back_from_the_loop() -> None:
    owner = FakeOwner()
    buf, block = fake_buffer(owner)
    del buf
    gc.collect()
    assert owner.taken == []  # a finalizer never touches the owner's state itself
    owner.run_loop()
    assert owner.taken == [block]


def test_with_the_loop_gone_the_block_is_orphaned_but_never_under_a_live_view() -> None:
    owner = FakeOwner(on_loop_thread=False, loop_alive=False)
    buf, block = fake_buffer(owner)
    view = buf.memoryview()
    buf.free()
    assert owner.orphaned == []  # the view still reads the memory
    del view
    gc.collect()
    assert owner.orphaned == [block] and owner.taken == []


def test_with_the_loop_gone_a_view_of_a_live_buffer_orphans_nothing() -> None:
    owner = FakeOwner(on_loop_thread=False, loop_alive=False)
    buf, block = fake_buffer(owner)
    view = buf.memoryview()
    del view
    gc.collect()
    assert owner.orphaned == []  # never freed: the buffer still owns the block
    buf.free()
    assert owner.orphaned == [block]


def test_a_zero_byte_buffer_has_nothing_to_hand_back() -> None:
    owner = FakeOwner()
    buf = PinnedBuffer(owner, None, 0)
    buf.free()
    buf.free()
    assert (buf.ptr, buf.capacity, owner.taken) == (0, 0, [])
