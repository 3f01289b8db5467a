"""Loading safetensors checkpoints through pool buffers: reads in threads, copies on a few
streams, each tensor handed over as soon as its bytes are on the device.

The selected tensors of each file form contiguous byte *regions* (a whole file's data when all
are selected); each region gets one device allocation, and is read in chunks that start at
multiples of ``chunk_bytes`` in the file (so that ``O_DIRECT`` can read them).  A chunk's life:

1. it is handed to a reader thread, while the buffers of the reads in flight fit under the
   pool's cap (the read-ahead window: a buffer comes back once the copy that reads it has run);
2. the reader thread takes a buffer (``allocate_blocking``: a cold pool pins its blocks in
   parallel) and fills it (``FileReader``: page cache or ``O_DIRECT``);
3. on the loop, its copy to the region is queued on the next stream, the buffer is recorded on
   that stream and freed, and a marker (an event) is recorded after it;
4. once the markers up to a tensor's last chunk have passed, the tensor is handed over.

The loop only queues copies and checks markers; reads and waits run in threads.  A cancelled
load waits for its reads in flight (their buffers are being written), frees them, and leaves the
copies already queued to the pool (each buffer comes back when its copy ends); its own pool is
closed, which waits for them.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
import math
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel

from .._buffer import PinnedBuffer
from .._checks import as_callback, as_size
from .._pool import PinnedPool
from ._format import Entry, Paths, checkpoint_files, read_header, regions, select
from ._reader import ALIGN, FileReader, ReadReport
from ._targets import make_target

#: the read-ahead window of a load's own pool, and its chunk, reader threads and streams
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_THREADS = min(16, os.cpu_count() or 1)
DEFAULT_STREAMS = 4


@dataclass
class _Chunk:
    reader: FileReader
    dest: Any  # the region's device (or host) buffer
    begin: int  # file offsets
    end: int
    region_begin: int
    last: list[Entry]  # the tensors whose last byte is in this chunk (in file order)

    @property
    def lead(self) -> int:
        """Bytes before ``begin`` in its buffer, so that file offsets keep their alignment."""
        return self.begin % ALIGN

    @property
    def buffer_bytes(self) -> int:
        return -(-(self.lead + self.end - self.begin) // ALIGN) * ALIGN


class Loaded(dict[str, Any]):
    """``load_safetensors``'s result: name -> tensor, and ``report`` (how the bytes were read)."""

    report: ReadReport


def _check_options(**counts: object) -> None:
    for name, value in counts.items():
        if as_size(value, name) < 1:
            raise ValueError(f"{name} must be >= 1, not {value!r}")
    if counts["chunk_bytes"] % ALIGN:  # type: ignore[operator]
        raise ValueError(f"chunk_bytes must be a multiple of {ALIGN}")


async def stream_safetensors(
    paths: Paths,
    device: Any = None,
    *,
    pool: PinnedPool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    names: Iterable[str] | None = None,
    direct: bool | str = "auto",
    progress: Callable[[int, int], object] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = DEFAULT_THREADS,
    streams: int = DEFAULT_STREAMS,
    report: ReadReport | None = None,
) -> AsyncIterator[tuple[str, Any]]:
    """``(name, tensor)`` for each tensor of a safetensors checkpoint, as soon as it is on
    ``device`` (a CUDA device: torch tensors, dtypes as stored; ``None``: NumPy arrays).

    ``paths``: a file, files, a directory, or a sharded checkpoint's ``*.index.json``;
    ``names``: only these tensors (only their bytes are read).  ``pool``: the pool whose buffers
    stage the bytes (default: one of its own, capped at ``max_bytes``, the read-ahead window).
    ``direct``: ``"auto"`` reads what the page cache holds from it and the rest ``O_DIRECT``;
    ``True``/``False`` force one way.  ``progress(done_bytes, total_bytes)`` runs on the loop.
    ``report``, if given, is filled with how the bytes were read.

    Raises ``ValueError`` naming the file and what is wrong for a malformed checkpoint, before
    any device memory is used.
    """
    _check_options(max_bytes=max_bytes, chunk_bytes=chunk_bytes, threads=threads, streams=streams)
    as_callback(progress, "progress")
    if direct not in ("auto", True, False):
        raise ValueError(f"direct must be 'auto', True or False, not {direct!r}")
    files = checkpoint_files(paths)
    headers = await anyio.to_thread.run_sync(lambda: [read_header(f) for f in files])
    chosen = select(headers, names)
    # (in a thread: the first CUDA calls, and cuda.bindings' import, take up to 100s of ms)
    target = await anyio.to_thread.run_sync(make_target, device, streams)
    target.check([e for entries in chosen for e in entries])
    readers: list[FileReader] = []
    own = pool is None
    try:
        readers.extend(FileReader(h.path, direct) for h in headers)
        if pool is None:
            pool = await PinnedPool(
                target.backend, max_bytes=max_bytes, device=target.device
            ).open()
        # (device memory in a thread: allocating gigabytes can take milliseconds)
        chunks = await anyio.to_thread.run_sync(_chunks, readers, chosen, target, chunk_bytes)
        for entry in (e for entries in chosen for e in entries if e.nbytes == 0):
            yield entry.name, target.tensor(None, 0, entry)
        total = sum(c.end - c.begin for c in chunks)
        async for item in _run(pool, target, chunks, threads, total, progress):
            yield item
    finally:
        with anyio.CancelScope(shield=True):
            if own and pool is not None:
                await pool.aclose()
            await anyio.to_thread.run_sync(target.close)
            for reader in readers:
                if report is not None:
                    report.add(reader.report)
                reader.close()


def _chunks(
    readers: Sequence[FileReader], chosen: Sequence[Sequence[Entry]], target: Any, size: int
) -> list[_Chunk]:
    chunks: list[_Chunk] = []
    for reader, entries in zip(readers, chosen, strict=True):
        for begin, end, members in regions([e for e in entries if e.nbytes]):
            dest = target.empty(end - begin)
            cuts = [begin, *range((begin // size + 1) * size, end, size), end]
            pending = deque(members)
            for a, b in itertools.pairwise(cuts):
                last = []
                while pending and pending[0].end <= b:
                    last.append(pending.popleft())
                chunks.append(_Chunk(reader, dest, a, b, begin, last))
    return chunks


async def _run(
    pool: PinnedPool,
    target: Any,
    chunks: list[_Chunk],
    threads: int,
    total: int,
    progress: Callable[[int, int], object] | None,
) -> AsyncIterator[tuple[str, Any]]:
    executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="aiopinned-read")
    reading: deque[tuple[_Chunk, concurrent.futures.Future[PinnedBuffer]]] = deque()
    queued: deque[tuple[Any, _Chunk]] = deque()  # (marker, chunk), in order
    todo, budget, held, done, copies = deque(chunks), pool.max_bytes or math.inf, 0, 0, 0
    # Every buffer is asked for at one size, so that all are one block size, reused (a chunk and
    # its lead never exceed ``chunk_bytes``: chunks are cut at its multiples).  The first one,
    # here, says how large the pool's blocks for it are (and stays cached for the first read).
    size = max((c.buffer_bytes for c in chunks), default=ALIGN)
    first = await pool.allocate(size)
    block = first.capacity
    first.free()
    try:
        while todo or reading:
            # Reads ahead, each in a reader thread that also takes its buffer (so that a cold
            # pool pins its blocks in parallel), within the cap: the buffers of all the reads
            # not yet handled here fit under it, so none waits for another's (those come back
            # only once this loop queues their copies), only for copies that end by themselves.
            while todo and len(reading) < 2 * threads and held + block <= budget:
                chunk = todo.popleft()
                reading.append((chunk, executor.submit(_fill, pool, size, chunk)))
                held += block
            chunk, job = reading[0]
            if not job.done():
                await anyio.to_thread.run_sync(concurrent.futures.wait, [job])  # (a cancel waits)
            reading.popleft()
            held -= block
            buf = job.result()  # (the read's error, if any)
            stream = target.streams[copies % len(target.streams)]
            try:
                at = chunk.begin - chunk.region_begin
                target.copy(chunk.dest, at, buf.ptr + chunk.lead, chunk.end - chunk.begin, stream)
                buf.record_stream(stream)
            finally:  # (queued, or failed: the buffer goes back either way)
                buf.free()
            copies += 1
            queued.append((target.marker(stream), chunk))
            done += chunk.end - chunk.begin
            if progress is not None:
                progress(done, total)
            await anyio.lowlevel.checkpoint()  # (reads may all be done: let the loop run)
            while queued and target.done(queued[0][0]):
                for item in _finished(target, queued.popleft()[1]):
                    yield item
        while queued:
            marker, chunk = queued.popleft()
            await anyio.to_thread.run_sync(target.wait, marker)
            for item in _finished(target, chunk):
                yield item
    finally:
        with anyio.CancelScope(shield=True):
            for _, job in reading:  # (cancelled: the reads in flight are writing buffers)
                await anyio.to_thread.run_sync(concurrent.futures.wait, [job])
                if job.exception() is None:
                    job.result().free()
            executor.shutdown(wait=False)


def _fill(pool: PinnedPool, size: int, chunk: _Chunk) -> PinnedBuffer:
    """Reader thread: a pool buffer, and ``chunk`` read into it (at its lead)."""
    buf = pool.allocate_blocking(size)
    try:
        chunk.reader.read_into(_view(buf.ptr + chunk.lead, chunk.end - chunk.begin), chunk.begin)
    except BaseException:
        buf.free()
        raise
    return buf


def _view(address: int, nbytes: int) -> memoryview:
    """Bytes at ``address`` (a live pool buffer's), with no view of the buffer itself: a
    buffer's views hold its block, and this one lives only as long as the read."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _finished(target: Any, chunk: _Chunk) -> Iterable[tuple[str, Any]]:
    for entry in chunk.last:
        yield entry.name, target.tensor(chunk.dest, entry.begin - chunk.region_begin, entry)


async def load_safetensors(
    paths: Paths,
    device: Any = None,
    *,
    pool: PinnedPool | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    names: Iterable[str] | None = None,
    direct: bool | str = "auto",
    progress: Callable[[int, int], object] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = DEFAULT_THREADS,
    streams: int = DEFAULT_STREAMS,
) -> Loaded:
    """Every tensor of a safetensors checkpoint on ``device``: :func:`stream_safetensors`,
    collected (the result's ``report`` says how the bytes were read)."""
    loaded, report = Loaded(), ReadReport()
    stream = stream_safetensors(
        paths, device, pool=pool, max_bytes=max_bytes, names=names, direct=direct,
        progress=progress, chunk_bytes=chunk_bytes, threads=threads, streams=streams,
        report=report,
    )  # fmt: skip
    try:
        async for name, tensor in stream:
            loaded[name] = tensor
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    loaded.report = report
    return loaded
