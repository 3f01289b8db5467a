"""benchmarks/bench_prefetch.py: the dataset, the pipelines and their checks, as modules."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from anyio import wait_all_tasks_blocked

from aiopinned import PinnedPool
from benchmarks import bench_prefetch as bench

from .conftest import until

SHARD = 64 * 1024

pytestmark = pytest.mark.anyio


@pytest.fixture
def dataset(tmp_path: Path) -> Any:
    return bench.open_dataset(tmp_path / "shards", 12, SHARD, log=lambda _: None)


async def test_the_pipeline_delivers_every_shard_once_in_order(dataset: Any) -> None:
    cap = 3 * SHARD
    async with PinnedPool("host", max_bytes=cap) as pool:
        for _ in range(2):  # the second pass runs on cached blocks
            device = bench.HostDevice(dataset.count, SHARD, work=1)
            report = await bench.pinned_pipeline(dataset, pool, device, readers=2)
            assert report.delivered == list(range(12))  # and pinned_pipeline verified the sums
            assert report.waits > 0  # read-ahead was held back by the cap
            s = pool.stats()
            assert s.peak_reserved_bytes <= cap and s.active_bytes == 0
    assert report.compute_busy_s > 0


async def test_read_ahead_stops_at_the_cap_until_copies_finish(dataset: Any) -> None:
    read: list[int] = []
    async with PinnedPool("host", max_bytes=3 * SHARD) as pool:
        device = bench.HostDevice(dataset.count, SHARD, work=0)
        gate = threading.Event()
        device.copy_stream.launch(gate.wait)  # the copies are held back
        try:
            async with anyio.create_task_group() as tg:

                async def run() -> None:
                    await bench.pinned_pipeline(dataset, pool, device, readers=2,
                                                after_read=lambda i, _: read.append(i))  # fmt: skip

                tg.start_soon(run)
                await until(lambda: len(read) == 3 and pool.stats().waiters == 1)
                await wait_all_tasks_blocked()
                # Three shards read and handed to copies that have not run: their blocks are
                # not reused, so the reader waits and the shards cannot be overwritten.
                assert sorted(read) == [0, 1, 2]
                assert (pool.stats().free_blocks, pool.stats().waiters) == (0, 1)
                gate.set()
        finally:
            gate.set()
    assert sorted(read) == list(range(12))  # and pinned_pipeline verified every checksum


async def test_the_pipeline_catches_a_corrupted_shard(dataset: Any) -> None:
    def corrupt(i: int, buf: Any) -> None:
        if i == 5:
            buf.memoryview()[100] ^= 0xFF

    async with PinnedPool("host", max_bytes=4 * SHARD) as pool:
        device = bench.HostDevice(dataset.count, SHARD, work=0)
        with pytest.raises(bench.ChecksumError, match=r"1 shards failed.*\[5\]"):
            await bench.pinned_pipeline(dataset, pool, device, readers=2, after_read=corrupt)


def test_verify_rejects_a_missing_repeated_or_swapped_shard(dataset: Any) -> None:
    sums = list(dataset.checksums)
    bench.verify(dataset, list(range(12)), sums)
    for delivered in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                      [1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):  # fmt: skip
        with pytest.raises(bench.ChecksumError, match="order"):
            bench.verify(dataset, delivered, sums)


async def test_the_pageable_baseline_delivers_the_same(dataset: Any) -> None:
    buffers = [np.empty(SHARD, np.uint8) for _ in range(3)]
    device = bench.HostDevice(dataset.count, SHARD, work=0)
    report = await bench.pageable_pipeline(dataset, buffers, device, readers=2)
    assert report.delivered == list(range(12))


def test_a_dataset_of_another_shape_is_recreated(dataset: Any) -> None:
    again = bench.open_dataset(dataset.root, 12, SHARD, log=lambda _: None)
    assert again.checksums == dataset.checksums
    smaller = bench.open_dataset(dataset.root, 4, 2 * SHARD, log=lambda _: None)
    assert smaller.count == 4 and sorted(p.name for p in dataset.root.glob("shard-*")) == [
        f"shard-{i:05d}.bin" for i in range(4)]  # fmt: skip
    assert all(smaller.path(i).stat().st_size == 2 * SHARD for i in range(4))
    with pytest.raises(ValueError):
        bench.open_dataset(dataset.root, 4, 1000)


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, bench.__file__, *args], capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip


def test_the_benchmark_prints_its_report(tmp_path: Path) -> None:
    out = run_bench("--backend", "host", "--data", str(tmp_path), "--size-gib", "0.01",
                    "--shard-mib", "1", "--depth", "3")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "checksums verified" in out.stdout and "pageable" in out.stdout


def test_bad_command_lines_are_refused_at_once() -> None:
    out = run_bench("--backend", "host", "--depth", "2", "--readers", "3")
    assert out.returncode == 2 and "--readers <= --depth" in out.stderr
