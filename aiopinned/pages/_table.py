"""``PinnedPages``: a host tier's pages, held from one pool, moved to and from device memory many
at a time.

Pages are addressed by index, so that a batch is a few NumPy arrays (pages, device addresses,
sizes), checked and queued with no Python object per piece (``_batch``).

The pool's rule that a block is never reused while a copy that reads or writes it may still run
holds the way ``record_stream`` keeps it, with one difference of timing: the table remembers
every stream it queued copies on, and records them on each page when it gives the pages back
(``free``).  An event recorded at that moment comes after every copy queued before it on that
stream, which is what recording at each copy would have given (the seed records its events at
``free`` too), and a batch costs no per-page bookkeeping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio.lowlevel
import numpy as np

from .._buffer import PinnedBuffer
from .._checks import as_positive
from .._pool import PinnedPool
from ..errors import InvalidBufferError
from ._batch import METHODS, CudaCopies, HostCopies, as_addresses, check

__all__ = ["PinnedPages"]

#: pages given back per loop step by ``aclose``
CHUNK = 4096


class PinnedPages:
    """``count`` pages of ``page_bytes`` pinned bytes each, from one pool, by index.

    ``await PinnedPages.allocate(pool, count, page_bytes)`` reserves and takes them;
    ``to_device`` / ``from_device`` queue many copies in one call; ``free()`` (or ``with``) gives
    them back once the copies queued on them have run.  Loop thread only, as the pool's
    ``allocate``.
    """

    def __init__(self, pool: PinnedPool, buffers: Sequence[PinnedBuffer]) -> None:
        if not buffers:
            raise ValueError("a PinnedPages needs at least one page")
        self.page_bytes = buffers[0].nbytes
        if any(b.nbytes != self.page_bytes or b.pool is not pool for b in buffers):
            raise ValueError("every page must be a buffer of the same size from the same pool")
        self.pool = pool
        self._buffers = list(buffers)
        #: each page's address (read-only)
        self.ptrs = np.array([b.ptr for b in buffers], dtype=np.int64)
        self.ptrs.setflags(write=False)
        self._streams: dict[Any, Any] = {}
        self._copies: HostCopies | CudaCopies = (
            HostCopies() if pool.backend != "cuda" else CudaCopies(pool.device or 0)
        )

    @classmethod
    async def allocate(
        cls, pool: PinnedPool, count: int, page_bytes: int, *, reserve: bool = True,
        timeout: float | None = None,
    ) -> PinnedPages:  # fmt: skip
        """Take ``count`` pages of ``page_bytes`` from ``pool``, pinning them first as one
        carved tier (``reserve``) unless ``reserve=False``.  A failure gives back what it took."""
        as_positive(count, "count")
        as_positive(page_bytes, "page_bytes")
        if reserve:
            await pool.reserve(count * page_bytes, block_bytes=page_bytes)
        taken: list[PinnedBuffer] = []
        try:
            for _ in range(count):
                taken.append(await pool.allocate(page_bytes, timeout=timeout))
        except BaseException:
            for buf in taken:
                buf.free()
            raise
        return cls(pool, taken)

    @property
    def count(self) -> int:
        return len(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def __getitem__(self, i: int) -> PinnedBuffer:
        """Page ``i``'s buffer (for views: ``numpy()``, ``torch()``; never ``free()`` it)."""
        self._check_open()
        return self._buffers[i]

    def to_device(
        self, pages: Any, device_ptrs: Any, stream: Any, *, nbytes: Any = None,
        method: str = "auto",
    ) -> int:  # fmt: skip
        """Queue copies of ``pages[k]`` (indices) to the device addresses ``device_ptrs[k]`` on
        ``stream``: ``nbytes`` each (default a whole page; an int, or one per piece).  Returns
        the bytes queued.  ``method``: ``"batch"`` (one driver call), ``"loop"`` (one per
        piece), ``"auto"`` (batch where the driver can).  Bad pieces are a ``ValueError`` before
        anything is queued."""
        return self._queue(pages, device_ptrs, stream, nbytes, method, to_device=True)

    def from_device(
        self, device_ptrs: Any, pages: Any, stream: Any, *, nbytes: Any = None,
        method: str = "auto",
    ) -> int:  # fmt: skip
        """Queue copies from the device addresses ``device_ptrs[k]`` into ``pages[k]``; as
        ``to_device`` otherwise (two pieces may not write one page)."""
        return self._queue(pages, device_ptrs, stream, nbytes, method, to_device=False)

    def _queue(self, pages: Any, device_ptrs: Any, stream: Any, nbytes: Any, method: str,
               to_device: bool) -> int:  # fmt: skip
        self._check_open()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {method!r}")
        idx = as_addresses(pages, "pages")
        dev = as_addresses(device_ptrs, "device_ptrs")
        sizes = as_addresses(self.page_bytes if nbytes is None else nbytes, "nbytes")
        if sizes.size == 1 and idx.size != 1:
            sizes = np.full(idx.size, sizes[0], dtype=np.int64)
        check(idx, dev, sizes, self.count, self.page_bytes, to_device)
        if not idx.size:
            return 0
        host = self.ptrs[idx]
        dsts, srcs = (dev, host) if to_device else (host, dev)
        self._copies.queue(dsts, srcs, sizes, stream, method)
        self._streams.setdefault(_key(stream), stream)
        return int(sizes.sum())

    def free(self) -> None:
        """Give every page back; each comes back to the pool once the copies queued on it have
        run.  A second call does nothing."""
        buffers, self._buffers = self._buffers, []
        self._give_back(buffers)

    async def aclose(self) -> None:
        """``free``, ``CHUNK`` pages at a time with the loop running in between (a tier of
        300,000 pages takes about a second to give back)."""
        buffers, self._buffers = self._buffers, []
        for at in range(0, len(buffers), CHUNK):
            self._give_back(buffers[at : at + CHUNK])
            await anyio.lowlevel.checkpoint()

    def _give_back(self, buffers: list[PinnedBuffer]) -> None:
        streams = list(self._streams.values())
        for buf in buffers:
            for stream in streams:
                buf.record_stream(stream)
            buf.free()

    def __enter__(self) -> PinnedPages:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.free()

    async def __aenter__(self) -> PinnedPages:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if not self._buffers:
            raise InvalidBufferError("these pages were freed")

    def __repr__(self) -> str:
        return f"<PinnedPages {self.count} x {self.page_bytes} bytes of {self.pool!r}>"


def _key(stream: Any) -> Any:
    """What tells streams apart: the stream, or its identity where it is not hashable."""
    try:
        hash(stream)
    except TypeError:
        return id(stream)
    return stream
