"""benchmarks/bench_devices.py: its report, without GPUs (the measuring runs on the GPU host)."""

from __future__ import annotations

import mmap

from aiopinned.backends import _memory
from benchmarks import bench_devices as bench


def report(device: int, window: tuple[float, float], ours: float) -> dict[str, object]:
    return {
        "device": device,
        "device_node": None,
        "pages": {"aiopinned": "default N0=100%", "torch": "default N0=100%"},
        "window": window,
        "gbps": {"aiopinned h2d": ours, "torch h2d": 50.0, "aiopinned d2h": 40.0,
                 "torch d2h": 50.0},
    }  # fmt: skip


def test_the_report_gives_each_device_its_ratios_and_how_much_the_workers_overlapped() -> None:
    reports = [report(0, (0.0, 10.0), 55.0), report(1, (1.0, 11.0), 50.0)]
    assert bench.overlap(reports) == 9 / 11
    text = bench.render(reports, "processes", 512, 7)
    assert "a process each" in text and "overlap 82%" in text
    assert "host->device  aiopinned" in text and "55.0 GB/s  1.10x of torch" in text
    assert "device->host  aiopinned" in text and "40.0 GB/s  0.80x of torch" in text
    assert text.count("cuda:") == 2


def test_where_gives_a_blocks_policy_and_its_pages_by_node() -> None:
    placed = _memory.Mapped(2 * _memory.HUGE_PAGE, threads=1, numa_node=0)
    plain = _memory.Mapped(mmap.PAGESIZE, threads=1)
    try:
        assert bench.where(placed.ptr) == "prefer:0 N0=100%"
        assert bench.where(plain.ptr) == "default N0=100%"
    finally:
        placed.close()
        plain.close()
