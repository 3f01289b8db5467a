"""aiopinned.metrics: the Prometheus collector, one process and several."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

pytest.importorskip("prometheus_client")  # (the optional extra; CI installs it)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aiopinned import HostStream, PinnedPool
from aiopinned.metrics import MultiProcessPublisher, PoolCollector

from .conftest import until

pytestmark = pytest.mark.anyio
KB = 1024


def scrape(registry: CollectorRegistry) -> dict[str, tuple[str, dict[tuple[str, str], float]]]:
    """name -> (type, {(sample name, le or ""): value}) from the text exposition format."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        samples = {(s.name, s.labels.get("le", "")): s.value for s in family.samples}
        out[family.name] = (family.type, samples)
    return out


async def test_a_scrape_reports_names_types_and_values_after_known_calls() -> None:
    async with PinnedPool("host", max_bytes=8 * KB) as pool:
        registry = CollectorRegistry()
        registry.register(PoolCollector(pool, name="staging", labels={"worker": "w0"}))
        a = await pool.allocate(4 * KB)  # pins (a miss)
        b = await pool.allocate(4 * KB)  # pins (a miss)
        stream = HostStream()
        a.record_stream(stream)
        a.free()  # comes back once the stream's (empty) work has run
        await until(lambda: pool.stats().free_blocks == 1)
        c = await pool.allocate(4 * KB)  # a hit

        async def waiter() -> None:
            (await pool.allocate(4 * KB)).free()  # waits: the cap is full

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await until(lambda: pool.stats().waiters == 1)
            m = scrape(registry)
            assert m["aiopinned_waiters"] == ("gauge", {("aiopinned_waiters", ""): 1})
            b.free()
        c.free()
        m = scrape(registry)
        gauges = {
            "aiopinned_reserved_bytes": 8 * KB,
            "aiopinned_active_bytes": 0,
            "aiopinned_cached_bytes": 8 * KB,
            "aiopinned_pending_events": 0,
            "aiopinned_waiters": 0,
            "aiopinned_max_bytes": 8 * KB,
        }
        for name, value in gauges.items():
            assert m[name] == ("gauge", {(name, ""): value}), name
        counters = {
            "aiopinned_cache_hits": 2,  # c, and the waiter (served b's block)
            "aiopinned_cache_misses": 2,
            "aiopinned_host_allocs": 2,
            "aiopinned_host_frees": 0,
            "aiopinned_waits": 1,
        }
        s = pool.stats()
        assert (s.cache_hits, s.cache_misses) == (counters["aiopinned_cache_hits"], 2)
        for name, value in counters.items():
            kind, samples = m[name]
            assert (kind, samples[(f"{name}_total", "")]) == ("counter", value), name
        kind, waits = m["aiopinned_wait_seconds"]
        assert kind == "histogram" and waits[("aiopinned_wait_seconds_count", "")] == 1
        assert waits[("aiopinned_wait_seconds_bucket", "+Inf")] == 1
        assert waits[("aiopinned_wait_seconds_sum", "")] == pytest.approx(
            s.wait_time_us_total / 1e6
        )
        kind, pins = m["aiopinned_pin_seconds"]
        assert kind == "histogram" and pins[("aiopinned_pin_seconds_count", "")] == 2
        buckets = sorted(v for (n, le), v in pins.items() if n.endswith("_bucket"))
        assert buckets[-1] == 2  # cumulative: the last (+Inf) bucket has them all
    # the labels
    sample = next(
        s
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
        if s.name == "aiopinned_reserved_bytes"
    )
    assert sample.labels == {"device": "host", "pool": "staging", "worker": "w0"}


def test_labels_may_not_redefine_device_or_pool() -> None:
    pool = PinnedPool("host")
    with pytest.raises(ValueError, match="redefine"):
        PoolCollector(pool, labels={"pool": "x"})
    with pytest.raises(TypeError, match="PinnedPool"):
        PoolCollector(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="interval_s"):
        MultiProcessPublisher(pool, interval_s=0)


WORKER = textwrap.dedent(
    """
    import sys, anyio
    from aiopinned import PinnedPool
    from aiopinned.metrics import MultiProcessPublisher

    async def main(n):
        async with PinnedPool("host", max_bytes=64 * 1024) as pool:
            async with MultiProcessPublisher(pool, name="staging", interval_s=0.01):
                for _ in range(n):
                    (await pool.allocate(4096)).free()
                held = await pool.allocate(8192)
                await anyio.sleep(0.05)
                print("ready", flush=True)
                sys.stdin.readline()  # hold until told to go
                held.free()

    anyio.run(main, int(sys.argv[1]))
    """
)


def test_two_worker_processes_are_aggregated_in_multiprocess_mode(tmp_path: Path) -> None:
    from prometheus_client import multiprocess

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(Path.cwd())}
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(n)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env={**env, "PATH": ""})
        for n in (3, 5)
    ]  # fmt: skip
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
        m = scrape(registry)
        # each worker: one 4 KiB block pinned and reused, then one 8 KiB block held
        assert m["aiopinned_active_bytes"][1][("aiopinned_active_bytes", "")] == 2 * 8 * KB
        assert m["aiopinned_reserved_bytes"][1][("aiopinned_reserved_bytes", "")] == 2 * 12 * KB
        assert m["aiopinned_max_bytes"][1][("aiopinned_max_bytes", "")] == 2 * 64 * KB
        hits = m["aiopinned_cache_hits"][1][("aiopinned_cache_hits_total", "")]
        assert hits == (3 - 1) + (5 - 1)  # every allocation but each worker's first two
        misses = m["aiopinned_cache_misses"][1][("aiopinned_cache_misses_total", "")]
        assert misses == 4
        pins = m["aiopinned_pin_seconds"][1]
        assert pins[("aiopinned_pin_seconds_count", "")] == 4
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.write("go\n")
                p.stdin.close()
            p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0]


async def test_two_pools_in_one_collector_write_each_family_once() -> None:
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse

    async with PinnedPool("host") as main, PinnedPool("host") as lane:
        (await main.allocate(4 * KB)).free()
        registry = CollectorRegistry()
        registry.register(PoolCollector({"main": main, "lane": lane}))
        families = list(parse(openmetrics(registry).decode()))  # ("Clashing name" if twice)
        names = [f.name for f in families]
        assert len(names) == len(set(names)) and "aiopinned_reserved_bytes" in names
        reserved = next(f for f in families if f.name == "aiopinned_reserved_bytes")
        assert {s.labels["pool"]: s.value for s in reserved.samples} == {"main": 4 * KB, "lane": 0}
        with pytest.raises(ValueError, match="Duplicated"):  # a second collector: refused now
            registry.register(PoolCollector(main, name="again"))


async def test_bad_names_and_label_values_are_refused_at_construction() -> None:
    async with PinnedPool("host") as pool:
        with pytest.raises(TypeError, match="'shard' must have a str value"):
            PoolCollector(pool, labels={"shard": 3})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="name must be a str"):
            PoolCollector(pool, name=3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="not a Prometheus label name"):
            PoolCollector(pool, labels={"a-b": "x"})
        with pytest.raises(TypeError, match="name must be a str"):
            PoolCollector({1: pool})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="str value"):
            MultiProcessPublisher(pool, labels={"shard": 3})  # type: ignore[dict-item]
