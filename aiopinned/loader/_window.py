"""A load's chunks, read ahead within a window and copied in order: reads in threads, copies on a
few streams, each tensor handed over as soon as its bytes are on the device.  A chunk's life:

1. it is handed to a reader thread while the window has room (the pool's cap: the read-ahead);
2. there, where ``direct="auto"`` and the page cache holds all of it, its pages in the file's
   read-only mapping are registered (``pin``: no copy by the CPU, the device reads the page cache);
   otherwise the thread takes a pool buffer (``allocate_blocking``: a cold pool pins its blocks in
   parallel) and fills it (``FileReader``: page cache or ``O_DIRECT``);
3. on the loop, its copy to the region is queued on the next stream, a buffer is recorded on that
   stream and freed, and a marker (an event) is recorded after it;
4. once the markers up to a tensor's last chunk have passed, the tensor is handed over, and the
   chunk's pages, if registered, are unregistered (in a thread).

The window counts a block for each chunk in a thread and for each registration not yet undone;
registrations are outside the pool, so one goes ahead only where the pool's pinned bytes fit
beside everything else, and reads too while any is live: the load's page-locked bytes stay under
the cap.  The loop only queues copies and checks markers; reads, registrations and waits run in
threads.  A load that ends early (cancelled, failed, closed) waits for the chunks in its
threads, frees their buffers, unregisters every registration once the copies reading it have
ended, and leaves the buffers of copies already queued to the pool (each comes back when its
copy ends).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import logging
import math
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from .._buffer import PinnedBuffer
from .._pool import PinnedPool
from ._chunks import Chunk
from ._reader import ALIGN, ReadReport

log = logging.getLogger("aiopinned")

#: whether ``direct="auto"`` registers cached chunks rather than reading them (measured faster:
#: see ``benchmarks/bench_load.py``'s ``aiopinned`` and ``aiopinned-read`` rows)
MAP_CACHED = True


@dataclass
class _Pin:
    """A chunk's page-rounded range of its file's mapping, registered for copies to read."""

    address: int  # (page-aligned)
    nbytes: int
    src: int  # the chunk's first byte


class Window:
    """One load's chunks: read or pinned ahead within the window, copied in order."""

    def __init__(
        self, pool: PinnedPool, target: Any, threads: int, map_cached: bool, report: ReadReport
    ) -> None:
        self.pool, self.target, self.threads, self.report = pool, target, threads, report
        self.map_cached = map_cached and MAP_CACHED and target.can_pin
        self.executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="aiopinned-read"
        )
        self.budget = pool.max_bytes or math.inf
        #: jobs in flight: (chunk, future of a pool buffer or a _Pin, sent to pin), in order
        self.reading: deque[tuple[Chunk, concurrent.futures.Future[PinnedBuffer | _Pin], bool]] = (
            deque()
        )
        #: copies queued: (marker, chunk, the pin it reads, if any), in order
        self.queued: deque[tuple[Any, Chunk, _Pin | None]] = deque()
        #: pins whose copies have ended, being unregistered
        self.releasing: list[concurrent.futures.Future[None]] = []
        #: the window's bytes taken: a block for each job in flight, and for each live pin
        self.held = 0
        self.pins = 0  # jobs sent to pin, until their pins are unregistered (or they read)
        self.block = self.size = 0
        self.copies = 0
        self._lock = threading.Lock()
        self._pinned = 0  # bytes registered now

    def submit(self, todo: deque[Chunk]) -> None:
        """Reads (or pins) ahead, in reader threads, while the window has room.

        The window counts every job in flight and every pin not yet unregistered.  A read's
        buffer comes back to the pool once its copy is queued; so that a pin (page cache
        registered, outside the pool) keeps the load's page-locked bytes under the cap with the
        pool's own, a pin goes ahead only where the pool's pinned bytes fit beside it, and
        while pins are live, reads do too."""
        while (
            todo and len(self.reading) < 2 * self.threads and self.held + self.block <= self.budget
        ):
            chunk = todo[0]
            pooled = self.pool.stats().reserved_bytes if (self.map_cached or self.pins) else 0
            fits = pooled + self.held + self.block <= self.budget
            pin = self.map_cached and fits and chunk.mappable and chunk.resident()
            if not pin and self.pins and not fits:
                return  # (a read now could take the pool past the window beside the pins)
            todo.popleft()
            job = self.executor.submit(self._fetch, chunk, pin)
            self.reading.append((chunk, job, pin))
            self.held += self.block
            self.pins += pin

    def _fetch(self, chunk: Chunk, pin: bool) -> PinnedBuffer | _Pin:
        """Reader thread: the chunk's range registered (where ``pin``, and it can be), or a pool
        buffer with the chunk read into it (at its lead)."""
        if pin and self.map_cached:
            base = chunk.reader.mapping()
            assert base is not None  # (mapped by chunk.resident())
            lo, hi = chunk.pages
            try:
                self.target.pin(base + lo, hi - lo)
            except Exception as exc:  # any refusal: read instead, from now on
                with self._lock:
                    if self.map_cached:
                        self.map_cached = False
                        self.report.mapped_refused = str(exc)
                        log.warning("aiopinned: %s; reading cached ranges instead", exc)
            else:
                with self._lock:
                    self._pinned += hi - lo
                    peak = max(self.report.mapped_peak_bytes, self._pinned)
                    self.report.mapped_peak_bytes = peak
                return _Pin(base + lo, hi - lo, base + chunk.begin)
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
        """The oldest job's outcome: its copy queued (the job's error, if any, raised)."""
        chunk, job, sent_to_pin = self.reading[0]
        if not job.done():
            await anyio.to_thread.run_sync(concurrent.futures.wait, [job])  # (a cancel waits)
        self.reading.popleft()
        source = job.result()  # (the job's error, if any)
        if sent_to_pin and not isinstance(source, _Pin):
            self.pins -= 1  # (the pin was refused: read instead)
        stream = self.target.streams[self.copies % len(self.target.streams)]
        at, nbytes = chunk.begin - chunk.region_begin, chunk.end - chunk.begin
        if isinstance(source, _Pin):
            pin: _Pin | None = source
            try:
                self.target.copy(chunk.dest, at, source.src, nbytes, stream)
            except BaseException:
                self._unpin_now(source)
                raise
            chunk.reader.add_mapped(nbytes)
        else:
            pin, buf = None, source
            self.held -= self.block
            try:
                self.target.copy(chunk.dest, at, buf.ptr + chunk.lead, nbytes, stream)
                buf.record_stream(stream)
            finally:  # (queued, or failed: the buffer goes back either way)
                buf.free()
        self.copies += 1
        self.queued.append((self.target.marker(stream), chunk, pin))

    def finished(self, wait: bool = False) -> list[tuple[str, Any]]:
        """The tensors whose copies have all ended (their pins sent to be unregistered), and
        the window given back by pins unregistered."""
        out: list[tuple[str, Any]] = []
        while self.queued and (wait or self.target.done(self.queued[0][0])):
            _, chunk, pin = self.queued.popleft()
            out.extend(_finished(self.target, chunk))
            if pin is not None:
                self.releasing.append(self.executor.submit(self._unpin, pin))
            wait = False
        for job in [j for j in self.releasing if j.done()]:
            self.releasing.remove(job)
            self.held -= self.block
            self.pins -= 1
            job.result()
        return out

    async def wait_any(self) -> None:
        """Nothing can go ahead: wait for the oldest copy (or pin being unregistered)."""
        if self.queued:
            await anyio.to_thread.run_sync(self.target.wait, self.queued[0][0])
        elif self.releasing:
            wait = concurrent.futures.wait
            await anyio.to_thread.run_sync(
                lambda: wait(self.releasing, return_when="FIRST_COMPLETED")
            )

    def _unpin(self, pin: _Pin) -> None:
        self.target.unpin(pin.address)
        with self._lock:
            self._pinned -= pin.nbytes

    def _unpin_now(self, pin: _Pin) -> None:
        self._unpin(pin)
        self.held -= self.block
        self.pins -= 1

    def cleanup(self) -> None:
        """Thread, the load ending (cancelled, failed or done): every read in flight awaited
        and its buffer freed, every pin unregistered once the copies reading it have ended."""
        for _, job, _ in self.reading:
            concurrent.futures.wait([job])
            if job.exception() is None:
                source = job.result()
                if isinstance(source, _Pin):
                    self._unpin_now(source)
                else:
                    source.free()
        self.reading.clear()
        for marker, _, pin in self.queued:
            if pin is not None:
                self.target.wait(marker)
                self._unpin_now(pin)
        self.queued.clear()
        concurrent.futures.wait(self.releasing)
        self.executor.shutdown(wait=True)


async def run(
    pool: PinnedPool,
    target: Any,
    chunks: list[Chunk],
    threads: int,
    total: int,
    progress: Callable[[int, int], object] | None,
    map_cached: bool,
    report: ReadReport,
) -> AsyncGenerator[tuple[str, Any]]:
    window = Window(pool, target, threads, map_cached, report)
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
            if not window.reading:
                await window.wait_any()
            else:
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
