"""Host memory mapped for pinning: anonymous ``mmap``, huge pages where the kernel allows (or
reserved ones: ``_hugepages``), the first touch of its pages spread over threads, and
registration in chunks.

Measured on the H200 host (DESIGN.md): ``mmap`` + ``MADV_HUGEPAGE`` + touching one byte per huge
page from 16 threads + ``cudaHostRegister`` pins 1 GiB in about 40 ms, against 360-570 ms for
``cudaHostAlloc``; most of ``cudaHostAlloc``'s time is faulting the pages in one thread.  Both
backends map memory here, so the host backend (and CI) runs the same path as the CUDA one, less
the registration.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import PinnedMemoryError
from . import _hugepages
from ._hugepages import HUGETLB, HugePages, hugetlb_error, hugetlb_flags

#: how a backend pins a new block (``PinnedPool(pinning=...)``)
PINNING_MODES = ("auto", "register", "alloc", *HUGETLB)
HUGE_PAGE = 2 << 20
#: the most one registration covers: one ``cudaHostRegister`` of 512 GiB or more fails (vLLM
#: PR #51081, which then registers 64 GiB at a time); a mapping past it is registered in chunks
REGISTER_CHUNK_BYTES = 64 << 30
#: below this, one thread touches the pages (starting threads would cost more than they save)
PARALLEL_TOUCH_BYTES = 64 << 20
_RESIDENT = bytes(i & 1 for i in range(256))  # mincore: bit 0 of each byte says resident

#: ``mbind`` has no wrapper in glibc (libnuma has one): the system call, by number
_SYS_MBIND = {"x86_64": 237, "aarch64": 235}.get(platform.machine())
_MPOL_PREFERRED = 1

try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
    _mincore: Any = _libc.mincore
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
except (OSError, AttributeError):  # pragma: no cover - not Linux or no mincore
    _libc = _mincore = None


def check_pinning(pinning: object) -> str:
    """A ``pinning`` mode, or the ``ValueError`` that lists them."""
    if pinning not in PINNING_MODES:
        raise ValueError(f"pinning must be one of {PINNING_MODES}, not {pinning!r}")
    return str(pinning)


def default_threads() -> int:
    """Touch threads: one per core, up to 16.  On the 16-core H200 host, pinning 1 GiB took
    157 / 71 / 52 / 43 ms with 1 / 4 / 8 / 16 threads (best of 3 each)."""
    return max(1, min(16, os.cpu_count() or 1))


class Mapped:
    """One anonymous mapping, its address, its size, and the chunks registered over it.

    ``pages``: the backend's transparent-huge-page state (advised while it says so); ``mode``:
    ``"hugetlb"``/``"hugetlb-1g"`` map reserved huge pages instead (the mapping is whole pages,
    ``size`` the bytes asked for)."""

    __slots__ = ("chunks", "map", "ptr", "size")

    def __init__(self, size: int, threads: int, numa_node: int | None = None,
                 pages: HugePages | None = None, mode: str = "auto") -> None:  # fmt: skip
        page = HUGETLB.get(mode, 0)
        length = -(-size // page) * page if page else size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (hugetlb_flags(page) if page else 0)
        try:
            self.map = mmap.mmap(-1, length, flags=flags)
        except (OSError, OverflowError, ValueError) as exc:
            if page and isinstance(exc, OSError):
                raise hugetlb_error(size, page, exc) from exc
            raise PinnedMemoryError(f"could not map {size} bytes of host memory: {exc}") from exc
        #: the addresses registered (``register``), each up to ``REGISTER_CHUNK_BYTES``
        self.chunks: list[int] = []
        huge = False
        advise = pages is None or pages.advise
        if not page and advise and size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP off: 4 KiB pages, slower to touch
                self.map.madvise(mmap.MADV_HUGEPAGE)
                huge = True
        anchor = ctypes.c_char.from_buffer(self.map)
        self.ptr = ctypes.addressof(anchor)
        del anchor  # release the buffer export, so that close() may unmap later
        self.size = size
        if numa_node is not None:
            try:
                place(self.ptr, size, numa_node)  # before the first touch, which places pages
            except PinnedMemoryError:
                self.map.close()
                raise
        if page:  # (reserved pages: one byte each faults the whole page in, never compacts)
            _spread([(a, 1) for a in range(self.ptr, self.ptr + size, page)], threads)
        else:
            fault_in(self.ptr, size, threads, huge=huge, pages=pages, no_huge=self._no_huge)

    @classmethod
    def registered(
        cls, size: int, threads: int, numa_node: int | None, pages: HugePages, mode: str,
        register: Callable[[int, int], None], unregister: Callable[[int], None], chunk: int,
    ) -> Mapped:  # fmt: skip
        """A mapping, its pages faulted in and ``register``ed in chunks (``register``); unmapped
        again where a registration fails."""
        mapped = cls(size, threads, numa_node, pages, mode)
        try:
            mapped.register(register, unregister, chunk)
        except BaseException:
            mapped.close()
            raise
        return mapped

    def _no_huge(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.map.madvise(mmap.MADV_NOHUGEPAGE)

    def register(self, register: Callable[[int, int], None], unregister: Callable[[int], None],
                 chunk: int = REGISTER_CHUNK_BYTES) -> None:  # fmt: skip
        """``register(ptr, n)`` over the mapping in chunks of at most ``chunk`` bytes (whole
        pages); where one fails, those before are unregistered and its error raised."""
        step = max(mmap.PAGESIZE, chunk // mmap.PAGESIZE * mmap.PAGESIZE)
        try:
            for at in range(self.ptr, self.ptr + self.size, step):
                register(at, min(step, self.ptr + self.size - at))
                self.chunks.append(at)
        except BaseException:
            self.unregister(unregister)
            raise

    def unregister(self, unregister: Callable[[int], None]) -> None:
        """``unregister(ptr)`` each chunk registered (the first failure raised once all are
        tried; the failed ones stay listed)."""
        failed: list[int] = []
        error: BaseException | None = None
        for at in self.chunks:
            try:
                unregister(at)
            except Exception as exc:
                failed.append(at)
                error = error or exc
        self.chunks = failed
        if error is not None:
            raise error

    def close(self) -> None:
        self.map.close()


def place(ptr: int, size: int, node: int) -> None:
    """Ask the kernel to put the pages of ``[ptr, ptr + size)`` on NUMA node ``node``
    (``mbind``, preferred: where that node is full, the kernel falls back to others)."""
    if _SYS_MBIND is None or _libc is None:
        raise PinnedMemoryError(f"NUMA placement is not supported on {platform.machine()}")
    mask = (ctypes.c_ulong * (node // 64 + 1))()
    mask[node // 64] = 1 << (node % 64)
    maxnode = ctypes.c_ulong(len(mask) * 64 + 1)
    if _libc.syscall(_SYS_MBIND, ctypes.c_void_p(ptr), ctypes.c_ulong(size), _MPOL_PREFERRED,
                     mask, maxnode, 0) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise PinnedMemoryError(f"could not place memory on NUMA node {node}: {os.strerror(err)}")


def fault_in(ptr: int, size: int, threads: int, *, huge: bool, pages: HugePages | None = None,
             no_huge: Callable[[], None] | None = None) -> None:  # fmt: skip
    """Fault every page of ``[ptr, ptr + size)`` in (it reads as zeros), over ``threads`` threads.

    Where huge pages were advised, writing one byte per huge page is enough: the kernel zeroes
    the whole 2 MiB page on that fault, so the pages are not written twice (1 GiB: 21 ms against
    27 ms for writing every byte, 16 threads, H200 host).  Wherever the kernel gave small pages
    instead (THP off or memory fragmented), ``mincore`` finds the pages still missing, and those
    are written in full.  (Tried and dropped: ``madvise(MADV_POPULATE_WRITE)``, 134-160 ms.)

    With ``pages``, the threads time their faults (``_hugepages``): where huge pages collapse,
    they stop, ``no_huge()`` advises the mapping back to small pages, and the rest is written
    as 4 KiB pages.
    """
    if not huge or _mincore is None:
        _spread(_pieces([(ptr, size)]), threads if size >= PARALLEL_TOUCH_BYTES else 1)
        return
    first_huge = -(-(ptr + 1) // HUGE_PAGE) * HUGE_PAGE
    watch = None if pages is None else (pages, threading.Event())
    _spread(
        [(ptr, 1)] + [(a, 1) for a in range(first_huge, ptr + size, HUGE_PAGE)],
        threads if size >= PARALLEL_TOUCH_BYTES else 1,
        watch,
    )
    if watch is not None and watch[1].is_set():  # collapsed: the rest in small pages
        watch[0].fall_back(size)
        if no_huge is not None:
            no_huge()
    missing = not_resident(ptr, size)
    if missing:
        big = sum(n for _, n in missing) >= PARALLEL_TOUCH_BYTES
        _spread(_pieces(missing), threads if big else 1)


def not_resident(ptr: int, size: int) -> list[tuple[int, int]]:
    """The runs of ``[ptr, ptr + size)`` (page aligned) that have no page yet, by ``mincore``."""
    page = mmap.PAGESIZE
    if _mincore is None:  # pragma: no cover - not Linux
        return [(ptr, size)]
    vec = (ctypes.c_ubyte * (-(-size // page)))()
    if _mincore(ptr, size, vec) != 0:  # pragma: no cover - the range is ours and mapped
        return [(ptr, size)]
    flags = bytes(vec).translate(_RESIDENT)
    return [
        (ptr + m.start() * page, min(m.end() * page, size) - m.start() * page)
        for m in re.finditer(b"\x00+", flags)
    ]


def _pieces(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` cut at huge-page boundaries, so that threads can share them out evenly."""
    out = []
    for start, length in runs:
        end = start + length
        while start < end:
            cut = min(end, (start // HUGE_PAGE + 1) * HUGE_PAGE)
            out.append((start, cut - start))
            start = cut
    return out


Watch = tuple[HugePages, threading.Event]


def _spread(jobs: list[tuple[int, int]], threads: int, watch: Watch | None = None) -> None:
    """Write zeros over each ``(address, length)``; ``threads`` threads take equal runs of jobs.
    ``ctypes.memset`` releases the GIL, so the threads fault pages in parallel.  ``watch``: each
    thread times its huge-page faults, and all stop once one finds them collapsed."""
    if threads <= 1 or len(jobs) <= 1:
        _zero(jobs, watch)
        return
    per = -(-len(jobs) // threads)
    workers = [
        threading.Thread(target=_zero, args=(jobs[i : i + per], watch), name="aiopinned-touch",
                         daemon=True)
        for i in range(0, len(jobs), per)
    ]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _zero(jobs: list[tuple[int, int]], watch: Watch | None = None) -> None:
    if watch is None:
        for address, length in jobs:
            ctypes.memset(address, 0, length)
        return
    pages, stop = watch
    window, t0 = _hugepages.WINDOW_PAGES, time.perf_counter()
    for i, (address, length) in enumerate(jobs, 1):
        ctypes.memset(address, 0, length)
        if i % window == 0:
            now = time.perf_counter()
            if stop.is_set() or pages.collapsed(window * HUGE_PAGE, now - t0):
                stop.set()
                return
            t0 = now
