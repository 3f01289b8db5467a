"""Loading safetensors checkpoints through pool buffers: ``stream_safetensors`` and
``load_safetensors`` (the plan in ``_chunks``, the reads and copies in ``_window``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio

from .._checks import as_callback, as_positive
from .._pool import PinnedPool
from ._chunks import plan
from ._format import Paths, checkpoint_files, read_header, select
from ._reader import ALIGN, FileReader, ReadReport, check_direct
from ._shared import load_shared
from ._targets import make_target
from ._window import run

#: the read-ahead window of a load's own pool, and its chunk, reader threads and streams
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_THREADS = min(16, os.cpu_count() or 1)
DEFAULT_STREAMS = 4


class Loaded(dict[str, Any]):
    """``load_safetensors``'s result: name -> tensor, and ``report`` (how the bytes were read)."""

    report: ReadReport


def _check_options(**counts: object) -> None:
    for name, value in counts.items():
        as_positive(value, name)
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
    check_direct(direct)
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
        chunks = await anyio.to_thread.run_sync(plan, readers, chosen, target, chunk_bytes)
        for entry in (e for entries in chosen for e in entries if e.nbytes == 0):
            yield entry.name, target.tensor(None, 0, entry)
        total = sum(c.end - c.begin for c in chunks)
        items = run(pool, target, chunks, threads, total, progress)
        async with contextlib.aclosing(items):  # (closed here, not when collected)
            async for item in items:
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
    group: Any = None,
) -> Loaded:
    """Every tensor of a safetensors checkpoint on ``device``: :func:`stream_safetensors`,
    collected (the result's ``report`` says how the bytes were read).

    ``group``: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for
    every rank) whose ranks all load this checkpoint: each reads its share of the bytes and
    receives the rest by broadcast (``_shared``); ``report`` and ``progress`` are this rank's."""
    if group is not None:
        options = {"pool": pool, "max_bytes": max_bytes, "direct": direct, "progress": progress,
                   "chunk_bytes": chunk_bytes, "threads": threads, "streams": streams}  # fmt: skip
        tensors, own = await load_shared(load_safetensors, paths, device, group, names, options)
        loaded = Loaded(tensors)
        loaded.report = own
        return loaded
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
