"""Huge pages that cannot stall, and reserved ones.

**Transparent huge pages** make pinning fast (one fault zeroes 2 MiB), but where memory is
fragmented and THP's ``defrag`` setting lets a fault compact memory first, faulting them in can
collapse to GB per minute (TensorRT-LLM #15430: a 300 GB rank never started).  So the touch
threads time themselves: where a thread faults in less than ``HugePages.min_rate`` bytes per
second over a window, every thread stops, the mapping is advised ``MADV_NOHUGEPAGE`` (the pages
still missing are then written as 4 KiB pages), and this backend asks for no more huge pages:
one log line, and ``PoolStats.huge_page_fallbacks``.

**Reserved huge pages** (``pinning="hugetlb"``, 2 MiB; ``"hugetlb-1g"``, 1 GiB): ``MAP_HUGETLB``
takes them from the pool the administrator set aside (``nr_hugepages``), which never compacts.
Where too few are free, the error says how many are needed and how to set them aside.
"""

from __future__ import annotations

import errno
import logging
import threading
from pathlib import Path

from ..errors import PinnedMemoryError

log = logging.getLogger("aiopinned")

#: ``pinning`` modes that map reserved huge pages, and their page size
HUGETLB = {"hugetlb": 2 << 20, "hugetlb-1g": 1 << 30}
MAP_HUGETLB = 0x40000
_MAP_HUGE_SHIFT = 26
#: huge pages a touch thread faults in between two looks at its rate (64 MiB)
WINDOW_PAGES = 32
#: the fault-in rate below which THP counts as collapsed: far under what 4 KiB pages reach
#: (1 GiB in 89 ms from 16 threads on the H200 host, about 0.7 GB/s per thread), far over the
#: "GB per minute" of a compaction stall
MIN_RATE = 256 << 20


class HugePages:
    """One backend's transparent-huge-page state: whether new mappings still ask for them."""

    __slots__ = ("_lock", "advise", "fallbacks", "min_rate")

    def __init__(self, min_rate: float = MIN_RATE) -> None:
        #: bytes per second per thread below which faulting in counts as collapsed
        self.min_rate = min_rate
        self.advise = True
        self.fallbacks = 0
        self._lock = threading.Lock()

    def collapsed(self, nbytes: int, seconds: float) -> bool:
        return nbytes < self.min_rate * seconds

    def fall_back(self, size: int) -> None:
        """A mapping of ``size`` bytes collapsed: no huge pages from now on."""
        with self._lock:
            first, self.advise = self.advise, False
            self.fallbacks += 1
        if first:
            log.warning(
                "aiopinned: faulting in huge pages collapsed below %.0f MiB/s per thread (THP "
                "compaction; see 'python -m aiopinned info'); mapping %d bytes and everything "
                "after it with 4 KiB pages", self.min_rate / (1 << 20), size)  # fmt: skip


def hugetlb_flags(page: int) -> int:
    """``mmap`` flags for reserved huge pages of ``page`` bytes."""
    return MAP_HUGETLB | ((page.bit_length() - 1) << _MAP_HUGE_SHIFT)


def hugetlb_error(size: int, page: int, exc: OSError, sys_root: Path = Path("/sys")) -> Exception:
    """The error for a refused ``MAP_HUGETLB`` mapping of ``size`` bytes: how many pages it
    needs, how many are free, and how to set more aside."""
    name = f"hugepages-{page >> 10}kB"
    total, free = hugetlb_pool(page, sys_root)
    need = -(-size // page)
    where = f"/sys/kernel/mm/hugepages/{name}/nr_hugepages"
    if exc.errno not in (errno.ENOMEM, errno.EINVAL) and total is not None:
        return PinnedMemoryError(f"could not map {size} bytes in {page >> 20} MiB pages: {exc}")
    return PinnedMemoryError(
        f"pinning {size} bytes in {page >> 20} MiB huge pages needs {need} free, and this host "
        f"has {'none' if free is None else free} free (nr_hugepages={total or 0}): set more "
        f"aside (echo N > {where}, or hugepages= on the kernel command line), or pass "
        f"pinning='auto' ({exc})"
    )


def hugetlb_pool(page: int, sys_root: Path = Path("/sys")) -> tuple[int | None, int | None]:
    """Reserved huge pages of ``page`` bytes: (set aside, free); ``None`` where unknown."""
    base = sys_root / "kernel" / "mm" / "hugepages" / f"hugepages-{page >> 10}kB"
    out: list[int | None] = []
    for name in ("nr_hugepages", "free_hugepages"):
        try:
            out.append(int((base / name).read_text()))
        except (OSError, ValueError):
            out.append(None)
    return out[0], out[1]


def thp_setting(name: str, sys_root: Path = Path("/sys")) -> str | None:
    """A transparent-huge-page setting in force (``enabled``, ``defrag``), or None."""
    try:
        text = (sys_root / "kernel" / "mm" / "transparent_hugepage" / name).read_text()
    except OSError:
        return None
    return next((w[1:-1] for w in text.split() if w.startswith("[")), None)
