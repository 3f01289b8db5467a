"""Pinning large memory: registration in chunks (a driver limit met), transparent huge pages that
fall back to 4 KiB pages where faulting them in collapses, and reserved huge pages."""

from __future__ import annotations

import logging
import mmap
from itertools import pairwise
from pathlib import Path

import pytest

from aiopinned import PinnedMemoryError, PinnedPool
from aiopinned.backends import HostBackend
from aiopinned.backends import _hugepages as hp
from aiopinned.backends._memory import Mapped

pytestmark = pytest.mark.anyio
KB, MB = 1024, 1 << 20


class LimitedRegistration(HostBackend):
    """The host backend, its "registration" refused for any call of ``limit`` bytes or more
    (as one ``cudaHostRegister`` of 512 GiB or more is)."""

    name = "limited"

    def __init__(self, limit: int, chunk: int) -> None:
        super().__init__()
        self.limit, self.register_chunk_bytes = limit, chunk
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register_range(self, ptr: int, size: int) -> None:
        if size >= self.limit:
            raise PinnedMemoryError(f"cudaHostRegister({size}) failed (limit {self.limit})")
        self.registered.append((ptr, size))

    def unregister_range(self, ptr: int) -> None:
        self.unregistered.append(ptr)


async def test_a_registration_limit_is_met_by_chunking() -> None:
    backend = LimitedRegistration(limit=48 * KB, chunk=32 * KB)
    async with PinnedPool(backend) as pool:
        buf = await pool.allocate(100 * KB)  # one block, registered in four chunks
        sizes = [n for _, n in backend.registered]
        assert sum(sizes) == buf.capacity and max(sizes) <= 32 * KB and len(sizes) >= 4
        starts = [p for p, _ in backend.registered]
        assert starts[0] == buf.ptr and all(b - a == 32 * KB for a, b in pairwise(starts))
        buf.free()
        assert await pool.reserve(256 * KB, block_bytes=8 * KB) == 256 * KB
        assert pool.stats().segments == 8  # a segment is never more than one registration
        assert max(n for _, n in backend.registered) <= 32 * KB
        await pool.empty_cache()
        assert sorted(backend.unregistered) == sorted(p for p, _ in backend.registered)
    unchunked = LimitedRegistration(limit=48 * KB, chunk=1 << 40)
    async with PinnedPool(unchunked) as pool:
        with pytest.raises(PinnedMemoryError, match="limit"):  # what chunking avoids
            await pool.allocate(100 * KB)
        assert pool.stats().reserved_bytes == 0


def test_a_failed_chunk_unregisters_those_before_it() -> None:
    registered: list[int] = []
    undone: list[int] = []

    def register(ptr: int, size: int) -> None:
        if len(registered) == 2:
            raise PinnedMemoryError("the third chunk fails")
        registered.append(ptr)

    mapped = Mapped(5 * mmap.PAGESIZE, 1)
    with pytest.raises(PinnedMemoryError, match="third"):
        mapped.register(register, undone.append, chunk=mmap.PAGESIZE)
    assert undone == registered and mapped.chunks == []
    mapped.close()


def test_huge_pages_that_collapse_fall_back_to_small_pages(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hp, "WINDOW_PAGES", 2)
    pages = hp.HugePages(min_rate=float("inf"))  # any rate counts as collapsed (simulated)
    with caplog.at_level(logging.WARNING, logger="aiopinned"):
        mapped = Mapped(16 * MB, 2, pages=pages)
    assert pages.fallbacks == 1 and not pages.advise
    assert "collapsed" in caplog.text and "4 KiB pages" in caplog.text
    assert bytes(mapped.map[:: mmap.PAGESIZE]) == bytes(16 * MB // mmap.PAGESIZE)  # all there
    mapped.close()
    again = Mapped(16 * MB, 2, pages=pages)  # no huge pages asked for any more: no second line
    assert pages.fallbacks == 1 and caplog.text.count("collapsed") == 1
    again.close()


def test_huge_pages_at_a_normal_rate_stay() -> None:
    pages = hp.HugePages()
    Mapped(16 * MB, 2, pages=pages).close()
    assert pages.fallbacks == 0 and pages.advise


async def test_the_pool_counts_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hp, "WINDOW_PAGES", 2)
    backend = HostBackend(threads=2)
    backend.huge_pages.min_rate = float("inf")
    async with PinnedPool(backend) as pool:
        buf = await pool.allocate(8 * MB)
        buf.numpy()[:] = 3
        assert pool.stats().huge_page_fallbacks == 1
        buf.free()


def test_reserved_huge_pages_that_are_missing_name_nr_hugepages(tmp_path: Path) -> None:
    base = tmp_path / "kernel" / "mm" / "hugepages" / "hugepages-2048kB"
    base.mkdir(parents=True)
    (base / "nr_hugepages").write_text("4\n")
    (base / "free_hugepages").write_text("1\n")
    err = hp.hugetlb_error(64 * MB, 2 * MB, OSError(12, "Cannot allocate memory"), tmp_path)
    text = str(err)
    assert isinstance(err, PinnedMemoryError)
    assert "needs 32 free" in text and "1 free" in text and "nr_hugepages=4" in text
    assert "hugepages-2048kB/nr_hugepages" in text
    assert hp.hugetlb_pool(2 * MB, tmp_path) == (4, 1)
    assert hp.hugetlb_pool(1 << 30, tmp_path) == (None, None)


async def test_hugetlb_pins_reserved_pages_or_says_what_is_missing() -> None:
    _, free = hp.hugetlb_pool(2 * MB)
    async with PinnedPool("host", pinning="hugetlb") as pool:
        if not free:
            with pytest.raises(PinnedMemoryError, match="nr_hugepages"):
                await pool.allocate(4 * MB)
            assert pool.stats().reserved_bytes == 0
            return
        buf = await pool.allocate(2 * MB)  # pragma: no cover - hosts with huge pages set aside
        buf.numpy()[:] = 1
        buf.free()


def test_pinning_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="hugetlb"):
        PinnedPool("host", pinning="huge")
    with pytest.raises(ValueError, match="pinning"):
        HostBackend(pinning="hugetlb-2g")
    assert hp.hugetlb_flags(2 * MB) == hp.MAP_HUGETLB | (21 << 26)
    assert hp.hugetlb_flags(1 << 30) == hp.MAP_HUGETLB | (30 << 26)
