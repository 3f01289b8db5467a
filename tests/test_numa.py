"""NUMA placement: PinnedPool(numa_node=...), with a fake topology and on this host's node 0."""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import pytest

from aiopinned import PinnedMemoryError, PinnedPool
from aiopinned.backends import _memory, _numa

pytestmark = pytest.mark.anyio


def topology(tmp_path: Path, node_count: int, devices: dict[str, int]) -> Path:
    """A fake /sys: ``node_count`` NUMA nodes, and PCI devices with their nodes."""
    for n in range(node_count):
        (tmp_path / "devices" / "system" / "node" / f"node{n}").mkdir(parents=True)
    for bus, node in devices.items():
        dev = tmp_path / "bus" / "pci" / "devices" / bus
        dev.mkdir(parents=True)
        (dev / "numa_node").write_text(f"{node}\n")
    return tmp_path


def test_auto_takes_the_devices_node(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = topology(tmp_path, 2, {"0000:3b:00.0": 0, "0000:d8:00.0": 1})
    caplog.set_level(logging.INFO, "aiopinned")
    assert _numa.resolve("auto", "0000:D8:00.0", "cuda:1", root) == 1
    assert _numa.resolve("auto", "0000:3b:00.0", "cuda:0", root) == 0
    assert "cuda:1 is on node 1" in caplog.text


def test_auto_places_nothing_where_no_node_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = topology(tmp_path, 1, {"0000:3b:00.0": -1})  # a one-node host, as the H200's
    caplog.set_level(logging.INFO, "aiopinned")
    assert _numa.resolve("auto", "0000:3b:00.0", "cuda:0", root) is None
    assert _numa.resolve("auto", None, "the host backend (no device)", root) is None
    assert caplog.text.count("placement is left to the kernel") == 2


def test_a_node_the_host_does_not_have_is_refused_at_once(tmp_path: Path) -> None:
    root = topology(tmp_path, 2, {})
    assert _numa.resolve(1, None, "x", root) == 1 and _numa.resolve(None, None, "x", root) is None
    with pytest.raises(ValueError, match=r"NUMA nodes are \[0, 1\]"):
        _numa.resolve(2, None, "x", root)


@pytest.mark.parametrize("bad", [-1, "near", 1.5, True])
def test_bad_numa_node_values_are_type_or_value_errors(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        PinnedPool("host", numa_node=bad)  # type: ignore[arg-type]


def node_policy(ptr: int) -> str:
    """The policy /proc/self/numa_maps shows for the mapping at ``ptr``."""
    where = _numa.placement(ptr)
    assert where is not None, "no /proc/self/numa_maps"
    return where[0]


def test_memory_is_placed_before_its_first_touch() -> None:
    mapped = _memory.Mapped(4 * _memory.HUGE_PAGE, threads=2, numa_node=0)
    try:
        assert node_policy(mapped.ptr) == "prefer:0"
        assert _memory.not_resident(mapped.ptr, mapped.size) == []  # and then faulted in
    finally:
        mapped.close()
    plain = _memory.Mapped(mmap.PAGESIZE, threads=1)
    try:
        assert node_policy(plain.ptr) == "default"
    finally:
        plain.close()


def test_placing_on_a_node_the_kernel_refuses_is_a_pinned_memory_error() -> None:
    with pytest.raises(PinnedMemoryError, match="NUMA node 63"):
        _memory.Mapped(mmap.PAGESIZE, threads=1, numa_node=63)  # (past resolve's check)


async def test_a_pool_places_its_blocks(caplog: pytest.LogCaptureFixture) -> None:
    async with PinnedPool("host", numa_node=0) as pool:
        buf = await pool.allocate(1 << 20)
        assert node_policy(buf.ptr) == "prefer:0"
        buf.free()
    caplog.set_level(logging.INFO, "aiopinned")
    async with PinnedPool("host", numa_node="auto") as pool:  # no device: nothing placed
        buf = await pool.allocate(1 << 20)
        assert node_policy(buf.ptr) == "default"
        buf.free()
    assert "placement is left to the kernel" in caplog.text


def test_placement_reads_the_mapping_holding_an_address(tmp_path: Path) -> None:
    (tmp_path / "numa_maps").write_text(
        "1000 default file=/bin/x mapped=2 N0=2 kernelpagesize_kB=4\n"
        "7f0000000000 prefer:1 anon=1024 dirty=1024 N0=24 N1=1000 kernelpagesize_kB=4\n"
        "7f1000000000 default anon=2 dirty=2 N0=2 kernelpagesize_kB=2048\n"
    )
    assert _numa.placement(0x7F0000000000 + 4096, tmp_path) == (
        "prefer:1",
        {0: 24 << 12, 1: 1000 << 12},
    )
    assert _numa.placement(0x7F1000000000, tmp_path) == ("default", {0: 4 << 20})
    assert _numa.placement(0x10, tmp_path) is None  # below every mapping
    assert _numa.placement(0x1000, tmp_path / "none") is None  # no numa_maps (no NUMA kernel)


def test_placement_counts_every_resident_byte_of_a_block() -> None:
    mapped = _memory.Mapped(4 * _memory.HUGE_PAGE, threads=2, numa_node=0)
    try:
        assert _numa.placement(mapped.ptr + 5) == ("prefer:0", {0: mapped.size})
    finally:
        mapped.close()
