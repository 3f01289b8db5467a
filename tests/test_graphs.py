"""Blocks recorded on a stream that is capturing a graph are kept until the graph is gone.

A host backend that can "capture" stands in for CUDA here: a stream put in capture mode reports a
capture, and a hold's release runs when the test destroys that graph (from another thread, as
CUDA's internal thread would).  ``test_gpu.py`` has the same on a real graph.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from aiopinned import CudaError, HostStream, PinnedPool
from aiopinned.backends.base import GraphCapture
from aiopinned.backends.host import HostBackend

from .conftest import Gate, until

pytestmark = pytest.mark.anyio
KB = 1024


class FakeGraph:
    def __init__(self) -> None:
        self.releases: list[Callable[[], object]] = []

    def destroy(self) -> None:
        """From another thread, as CUDA's own thread runs a user object's destructor."""
        worker = threading.Thread(target=lambda: [r() for r in self.releases])
        worker.start()
        worker.join()


class CaptureBackend(HostBackend):
    name = "capturing"

    def __init__(self) -> None:
        super().__init__()
        self.capturing: dict[HostStream, FakeGraph] = {}
        self.broken = False  # the capture was invalidated: asking about it fails

    def capture_of(self, stream: Any) -> FakeGraph | None:
        if self.broken:
            raise CudaError("the capture was invalidated (test)")
        return self.capturing.get(stream)

    def hold_for_graph(self, capture: FakeGraph, release: Callable[[], object]) -> None:
        capture.releases.append(release)


def test_the_fake_is_what_the_pool_looks_for() -> None:
    assert isinstance(CaptureBackend(), GraphCapture)
    assert not isinstance(HostBackend(), GraphCapture)


async def test_a_block_recorded_during_capture_waits_for_the_graph() -> None:
    backend, stream, graph = CaptureBackend(), HostStream(), FakeGraph()
    async with PinnedPool(backend) as pool:
        buf = await pool.allocate(64 * KB)
        ptr = buf.ptr
        backend.capturing[stream] = graph
        assert buf.record_stream(stream)  # a captured copy reads it at every replay
        del backend.capturing[stream]  # the capture ended; the graph lives on
        buf.free()
        other = await pool.allocate(64 * KB)  # not the held block
        assert other.ptr != ptr and pool.stats().free_blocks == 0
        graph.destroy()
        await until(lambda: pool.stats().free_blocks == 1)
        other.free()
        assert (await pool.allocate(64 * KB)).ptr in {ptr, other.ptr}


async def test_a_block_freed_while_its_stream_captures_waits_for_the_graph_then_the_stream() -> (
    None
):
    backend, stream, graph, gate = CaptureBackend(), HostStream(), FakeGraph(), Gate()
    async with PinnedPool(backend) as pool:
        buf = await pool.allocate(64 * KB)
        stream.launch(gate)  # work queued before the capture, still running
        buf.record_stream(stream)
        backend.capturing[stream] = graph  # an event recorded now would be a graph node
        buf.free()
        assert pool.stats().pending_events == 0  # none recorded during the capture
        del backend.capturing[stream]
        graph.destroy()
        await until(lambda: pool.stats().pending_events == 1)  # now the stream's own event
        assert pool.stats().free_blocks == 0
        gate.open()
        await until(lambda: pool.stats().free_blocks == 1)


async def test_a_record_from_another_thread_during_capture_holds_the_block() -> None:
    backend, stream, graph = CaptureBackend(), HostStream(), FakeGraph()
    async with PinnedPool(backend) as pool:
        buf = await pool.allocate(4 * KB)
        backend.capturing[stream] = graph
        worker = threading.Thread(target=buf.record_stream, args=(stream,))
        worker.start()
        worker.join()
        await until(lambda: buf._block is not None and buf._block.graphs == 1)
        del backend.capturing[stream]
        buf.free()
        assert pool.stats().free_blocks == 0
        graph.destroy()
        await until(lambda: pool.stats().free_blocks == 1)


async def test_synchronize_refuses_a_capturing_stream() -> None:
    backend, stream = CaptureBackend(), HostStream()
    async with PinnedPool(backend) as pool:
        backend.capturing[stream] = FakeGraph()
        with pytest.raises(RuntimeError, match="capturing a CUDA graph"):
            await pool.synchronize(stream)
        del backend.capturing[stream]
        await pool.synchronize(stream)


async def test_a_held_block_outlives_its_pool_until_the_graph_is_gone() -> None:
    backend, stream, graph = CaptureBackend(), HostStream(), FakeGraph()
    pool = await PinnedPool(backend).open()
    buf = await pool.allocate(64 * KB)
    backend.capturing[stream] = graph
    buf.record_stream(stream)
    del backend.capturing[stream]
    buf.free()
    await pool.aclose()  # the held block is not idle: it stays pinned
    assert len(backend._maps) == 1
    graph.destroy()
    await until(lambda: not backend._maps)  # unpinned once the graph is gone


async def test_a_capture_that_cannot_be_asked_about_loses_no_block() -> None:
    backend, stream, gate = CaptureBackend(), HostStream(), Gate()
    async with PinnedPool(backend) as pool:
        buf = await pool.allocate(4 * KB)
        stream.launch(gate)
        buf.record_stream(stream)
        backend.broken = True
        buf.free()  # logged; the block waits for its stream as any other
        assert pool.stats().pending_events == 1 and pool.stats().free_blocks == 0
        gate.open()
        await until(lambda: pool.stats().free_blocks == 1)
        backend.broken = False


def test_the_cuda_backends_poller_runs_the_releases_once_cuda_posts() -> None:
    """CUDA's thread calls ``sem_post`` on the hold's semaphore (no Python there); the poller
    then runs the releases, and stops once no hold is left."""
    from aiopinned.backends import _graphhold

    holds, hold, called = _graphhold.GraphHolds(), _graphhold._Hold(), threading.Event()
    hold.releases.append(called.set)
    with holds._lock:
        holds._holds[7] = hold
        holds._start()
    assert not called.wait(3 * _graphhold.POLL_S)
    _graphhold._libc.sem_post(hold.sem)  # what the user object's destructor does
    assert called.wait(5)
    deadline = threading.Event()
    for _ in range(100):
        if not holds._polling:
            break
        deadline.wait(0.01)
    assert not holds._polling and not holds._holds
