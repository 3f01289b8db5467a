"""Reading file ranges into pinned memory the fastest way for each: what the page cache holds is
copied out of it, and what it does not is read with ``O_DIRECT`` straight into the buffer (DMA
from the disk, no copy by the CPU and no page cache filled).

``FileReader.read_into`` is blocking (call it from a worker thread: every read releases the GIL).
With ``direct="auto"`` each range starts with ``preadv2(RWF_NOWAIT)`` of its first page (a miss
asked for whole starts readahead that ``O_DIRECT`` would read again), then of the rest, which
copies what is cached and stops at the first page that is not; the rest goes ``O_DIRECT`` (its
page-aligned middle; the unaligned head and tail are read the ordinary way).  ``True`` reads
every aligned middle ``O_DIRECT``, ``False`` reads everything through the page cache (as
``auto`` does where the kernel or the file system cannot say what is cached).  ``O_DIRECT``
needs the file offset, the length and the memory address aligned to the device's block: the
caller lays a range out so that file offset ``o`` lands at an address congruent to ``o`` modulo
``ALIGN`` (pool blocks are page-aligned, so a buffer that starts at an aligned file offset
does).  Where the file
system refuses ``O_DIRECT`` (tmpfs, some network file systems), the reader says so once in a log
line and in its report, and reads through the page cache from then on.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("aiopinned")

#: the alignment ``O_DIRECT`` reads keep (a page: every block device's logical block divides it)
ALIGN = 4096
DIRECT_MODES = ("auto", True, False)
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


@dataclass
class ReadReport:
    """What a reader did, in bytes."""

    cached_bytes: int = 0  #: copied out of the page cache (found resident)
    direct_bytes: int = 0  #: read ``O_DIRECT`` into pinned memory
    buffered_bytes: int = 0  #: read through the page cache (not resident, or not aligned)
    #: why ``O_DIRECT`` was refused, if it was (then everything went through the page cache)
    direct_refused: str | None = None

    @property
    def moved_bytes(self) -> int:
        """Every byte brought in, however it came."""
        return self.cached_bytes + self.direct_bytes + self.buffered_bytes

    def add(self, other: ReadReport) -> None:
        self.cached_bytes += other.cached_bytes
        self.direct_bytes += other.direct_bytes
        self.buffered_bytes += other.buffered_bytes
        self.direct_refused = self.direct_refused or other.direct_refused


def check_direct(direct: object) -> None:
    if direct not in DIRECT_MODES:
        raise ValueError(f"direct must be one of {DIRECT_MODES}, not {direct!r}")


class FileReader:
    """One open file, read by range into memory the caller owns (any number of threads)."""

    def __init__(self, path: str | os.PathLike[str], direct: bool | str = "auto") -> None:
        check_direct(direct)
        self.path, self.direct = os.fspath(path), direct
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._direct_fd: int | None = None
        #: whether ``RWF_NOWAIT`` can tell what is cached (where not, ``auto`` reads buffered)
        self._nowait = bool(_NOWAIT)
        self._lock = threading.Lock()
        self.report = ReadReport()

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def read_into(self, view: memoryview, offset: int) -> ReadReport:
        """Fill ``view`` (writable, C-contiguous bytes) from the file at ``offset`` (blocking);
        what this call did.  ``EOFError`` where the file ends first.  Memory whose address is not
        congruent to ``offset`` modulo ``ALIGN`` is read through the page cache."""
        report, done, n = ReadReport(), 0, len(view)
        direct = self.direct
        if direct == "auto":
            if self._nowait:
                done = report.cached_bytes = self._cached(view, offset)
            direct = self._nowait  # (residency unknown: the page cache, which is never slow)
        if done < n and direct is not False and _address(view) % ALIGN == offset % ALIGN:
            start = -(-(offset + done) // ALIGN) * ALIGN  # the aligned middle of what is left
            stop = (offset + n) // ALIGN * ALIGN
            if stop > start and self._direct(view, offset, start, stop, report):
                self._buffered(view, offset, done, start - offset, report)
                done = stop - offset
        self._buffered(view, offset, done, n, report)
        with self._lock:
            self.report.add(report)
        return report

    def _cached(self, view: memoryview, offset: int) -> int:
        """What the page cache holds from ``offset`` on, copied (no wait for the disk).

        The first page is asked for alone: a ``RWF_NOWAIT`` read that finds its first page
        missing still starts the kernel's readahead for what it asked (Linux 5.9 on), which
        ``O_DIRECT`` then reads again: a whole 16 MiB chunk asked for at once had 8 MiB of it
        read ahead into the page cache on CI's disk, half of a cold load's reads done twice."""
        done = 0
        while done < len(view):
            ask = view[done:] if done else view[: ALIGN - offset % ALIGN]
            try:
                got = os.preadv(self._fd, [ask], offset + done, _NOWAIT)
            except BlockingIOError:  # the next page is not resident
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # (the file system cannot say what is cached)
                return done
            if got <= 0:
                break
            done += got
        return done

    def _direct(
        self, view: memoryview, offset: int, start: int, stop: int, report: ReadReport
    ) -> bool:
        """``[start, stop)`` (aligned file offsets) ``O_DIRECT``; ``False`` where refused."""
        fd = self._open_direct()
        if fd is None:
            return False
        done = start
        while done < stop:
            try:
                got = os.preadv(fd, [view[done - offset : stop - offset]], done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or done != start:
                    raise
                self._refuse(f"O_DIRECT read refused: {exc}")
                return False
            if got <= 0:
                raise EOFError(f"{self.path}: ends at {done}, before {stop}")
            done += got
        report.direct_bytes += stop - start
        return True

    def _buffered(
        self, view: memoryview, offset: int, begin: int, end: int, report: ReadReport
    ) -> None:
        done = begin
        while done < end:
            got = os.preadv(self._fd, [view[done:end]], offset + done)
            if got <= 0:
                raise EOFError(f"{self.path}: ends at {offset + done}, before {offset + end}")
            done += got
        report.buffered_bytes += end - begin

    def _open_direct(self) -> int | None:
        with self._lock:
            if self.report.direct_refused is not None:
                return None
            if self._direct_fd is None:
                try:
                    self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
                except OSError as exc:
                    self._direct_fd = -1
                    self._refuse_locked(f"O_DIRECT open refused: {exc}")
            return None if self._direct_fd in (None, -1) else self._direct_fd

    def _refuse(self, why: str) -> None:
        with self._lock:
            self._refuse_locked(why)

    def _refuse_locked(self, why: str) -> None:
        """Once: a log line, and the report says why (the descriptor closes with the reader:
        another thread may be reading through it)."""
        if self.report.direct_refused is None:
            self.report.direct_refused = why
            log.warning("aiopinned: %s: %s; reading through the page cache", self.path, why)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0


def drop_page_cache(paths: Iterable[str | os.PathLike[str]]) -> None:
    """Drop the files' pages from the page cache (written back first: dirty pages stay), so
    that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
