"""Host memory mapped for pinning: anonymous ``mmap``, huge pages where the kernel allows, and the
first touch of its pages spread over threads.

Measured on the H200 host (DESIGN.md): ``mmap`` + ``MADV_HUGEPAGE`` + touching from 16 threads +
``cudaHostRegister`` pins 1 GiB in 53 ms, against 550-600 ms for ``cudaHostAlloc``; most of
``cudaHostAlloc``'s time is faulting the pages in one thread.  Both backends map memory here, so
the host backend (and CI) runs the same path as the CUDA one, less the registration.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading

from ..errors import PinnedMemoryError

#: how a backend pins a new block (``PinnedPool(pinning=...)``)
PINNING_MODES = ("auto", "register", "alloc")
HUGE_PAGE = 2 << 20
#: below this, one thread touches the pages (starting threads would cost more than they save)
PARALLEL_TOUCH_BYTES = 64 << 20


def default_threads() -> int:
    """Touch threads: one per core, up to 16.  On the 16-core H200 host, pinning 1 GiB took
    182 / 79 / 58 / 47 ms with 1 / 4 / 8 / 16 threads (best of 3 each)."""
    return max(1, min(16, os.cpu_count() or 1))


class Mapped:
    """One anonymous mapping, its address, and its size."""

    __slots__ = ("map", "ptr", "size")

    def __init__(self, size: int, threads: int) -> None:
        try:
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, OverflowError, ValueError) as exc:
            raise PinnedMemoryError(f"could not map {size} bytes of host memory: {exc}") from exc
        if size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP off: 4 KiB pages, slower to touch
                self.map.madvise(mmap.MADV_HUGEPAGE)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.ptr = ctypes.addressof(anchor)
        del anchor  # release the buffer export, so that close() may unmap later
        self.size = size
        touch(self.ptr, size, threads)

    def close(self) -> None:
        self.map.close()


def touch(ptr: int, size: int, threads: int) -> None:
    """Fault every page of ``[ptr, ptr + size)`` in (writing zeros), over ``threads`` threads.

    ``ctypes.memset`` releases the GIL, so the threads run in parallel.  (Tried and dropped:
    ``madvise(MADV_POPULATE_WRITE)``, which saves the second write of each page, took 134 ms
    for 1 GiB on the H200 host from one thread and 160 ms from 16, against about 40 ms here.)
    """
    if size < PARALLEL_TOUCH_BYTES or threads <= 1:
        ctypes.memset(ptr, 0, size)
        return
    step = -(-size // threads // HUGE_PAGE) * HUGE_PAGE  # chunks on huge-page boundaries
    workers = [
        threading.Thread(
            target=ctypes.memset,
            args=(ptr + off, 0, min(step, size - off)),
            name="aiopinned-touch",
            daemon=True,
        )
        for off in range(0, size, step)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
