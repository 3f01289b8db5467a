"""A load's chunks, read ahead within a window and copied in order: reads in threads, copies on a
few streams, each tensor handed over as soon as its bytes are on the device.  A chunk's life:

1. it is handed to a reader thread while the buffers of the reads not yet handled fit under the
   pool's cap (the read-ahead window: a buffer comes back once the copy that reads it has run);
2. the reader thread takes a buffer (``allocate_blocking``: a cold pool pins its blocks in
   parallel) and fills it (``FileReader``: page cache or ``O_DIRECT``);
3. on the loop, its copy to the region is queued on the next stream, the buffer is recorded on
   that stream and freed, and a marker (an event) is recorded after it;
4. once the markers up to a tensor's last chunk have passed, the tensor is handed over.

The loop only queues copies and checks markers; reads and waits run in threads.  A load that
ends early (cancelled, failed, closed) waits for the reads in its threads (their buffers are
being written) and frees their buffers, and leaves the buffers of copies already queued to the
pool (each comes back when its copy ends).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import math
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

import anyio
import anyio.lowlevel

from .._buffer import PinnedBuffer
from .._pool import PinnedPool
from ._chunks import Chunk
from ._reader import ALIGN


class Window:
    """One load's chunks: read ahead within the window, copied in order."""

    def __init__(self, pool: PinnedPool, target: Any, threads: int) -> None:
        self.pool, self.target, self.threads = pool, target, threads
        self.executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="aiopinned-read"
        )
        self.budget = pool.max_bytes or math.inf
        #: reads in flight: (chunk, future of its filled buffer), in order
        self.reading: deque[tuple[Chunk, concurrent.futures.Future[PinnedBuffer]]] = deque()
        #: copies queued: (marker, chunk), in order
        self.queued: deque[tuple[Any, Chunk]] = deque()
        self.held = 0  # the buffers of the reads not yet handled
        self.block = self.size = 0
        self.copies = 0

    def submit(self, todo: deque[Chunk]) -> None:
        """Reads ahead, each in a reader thread that also takes its buffer (so that a cold pool
        pins its blocks in parallel), within the cap: the buffers of all the reads not yet
        handled fit under it, so none waits for another's (those come back only once the loop
        queues their copies), only for copies that end by themselves."""
        while (
            todo and len(self.reading) < 2 * self.threads and self.held + self.block <= self.budget
        ):
            chunk = todo.popleft()
            self.reading.append((chunk, self.executor.submit(self._fill, chunk)))
            self.held += self.block

    def _fill(self, chunk: Chunk) -> PinnedBuffer:
        """Reader thread: a pool buffer, and ``chunk`` read into it (at its lead)."""
        buf = self.pool.allocate_blocking(self.size)
        try:
            chunk.reader.read_into(
                _view(buf.ptr + chunk.lead, chunk.end - chunk.begin), chunk.begin
            )
        except BaseException:
            buf.free()
            raise
        return buf

    async def handle_next(self) -> None:
        """The oldest read's buffer: its copy queued (the read's error, if any, raised)."""
        chunk, job = self.reading[0]
        if not job.done():
            await anyio.to_thread.run_sync(concurrent.futures.wait, [job])  # (a cancel waits)
        self.reading.popleft()
        self.held -= self.block
        buf = job.result()
        stream = self.target.streams[self.copies % len(self.target.streams)]
        at, nbytes = chunk.begin - chunk.region_begin, chunk.end - chunk.begin
        try:
            self.target.copy(chunk.dest, at, buf.ptr + chunk.lead, nbytes, stream)
            buf.record_stream(stream)
        finally:  # (queued, or failed: the buffer goes back either way)
            buf.free()
        self.copies += 1
        self.queued.append((self.target.marker(stream), chunk))

    def finished(self, wait: bool = False) -> list[tuple[str, Any]]:
        """The tensors whose copies have all ended (``wait``: the oldest copy has ended)."""
        out: list[tuple[str, Any]] = []
        while self.queued and (wait or self.target.done(self.queued[0][0])):
            out.extend(_finished(self.target, self.queued.popleft()[1]))
            wait = False
        return out

    def cleanup(self) -> None:
        """Thread, the load ending (cancelled, failed or done): every read in flight awaited
        and its buffer freed."""
        for _, job in self.reading:
            concurrent.futures.wait([job])
            if job.exception() is None:
                job.result().free()
        self.reading.clear()
        self.executor.shutdown(wait=True)


async def run(
    pool: PinnedPool,
    target: Any,
    chunks: list[Chunk],
    threads: int,
    total: int,
    progress: Callable[[int, int], object] | None,
) -> AsyncGenerator[tuple[str, Any]]:
    window = Window(pool, target, threads)
    todo, done = deque(chunks), 0
    # Every buffer is asked for at one size, so that all are one block size, reused (a chunk and
    # its lead never exceed ``chunk_bytes``: chunks are cut at its multiples).  The first one,
    # here, says how large the pool's blocks for it are (and stays cached for the first read).
    window.size = max((c.buffer_bytes for c in chunks), default=ALIGN)
    first = await pool.allocate(window.size)
    window.block = first.capacity
    first.free()
    try:
        while todo or window.reading:
            window.submit(todo)
            chunk = window.reading[0][0]
            await window.handle_next()
            done += chunk.end - chunk.begin
            if progress is not None:
                progress(done, total)
            await anyio.lowlevel.checkpoint()  # (reads may all be done: let the loop run)
            for item in window.finished():
                yield item
        while window.queued:
            await anyio.to_thread.run_sync(target.wait, window.queued[0][0])
            for item in window.finished(wait=True):
                yield item
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(window.cleanup)


def _view(address: int, nbytes: int) -> memoryview:
    """Bytes at ``address`` (a live pool buffer's), with no view of the buffer itself: a
    buffer's views hold its block, and this one lives only as long as the read."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _finished(target: Any, chunk: Chunk) -> Iterable[tuple[str, Any]]:
    for entry in chunk.last:
        yield entry.name, target.tensor(chunk.dest, entry.begin - chunk.region_begin, entry)
