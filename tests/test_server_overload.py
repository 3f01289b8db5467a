"""The example server under overload: bounded memory, 503s, dropped slow clients, a bounded
shutdown.  The server runs as a process (its own RSS, its own signals) or in this process (where
its device streams can be held)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import anyio
import httpx
import pytest

from benchmarks import bench_server

from .conftest import until
from .test_bench_server import argv, held_streams, payload

pytestmark = pytest.mark.anyio
MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # (uvicorn runs on asyncio)


async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def head(length: int) -> bytes:
    return f"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer: status, headers (lower-case names), body."""
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, body


async def upload(url: str, body: bytes, piece: int = 64 << 10) -> tuple[int, bytes]:
    """POST ``body`` over a connection of its own, in pieces, as flow control allows."""
    reader, writer = await open_raw(url)
    try:
        writer.write(head(len(body)))
        view = memoryview(body)
        for off in range(0, len(body), piece):
            writer.write(view[off : off + piece])
            await writer.drain()
        status, _, answer = await read_answer(reader)
        return status, answer
    finally:
        writer.close()


async def test_waiting_connections_do_not_grow_the_servers_memory() -> None:
    """100, then 400, concurrent uploads of 1 MiB under a 4 MiB cap: every answer is right, the
    cap holds, and peak RSS grows by less than 0.25 MiB per extra connection (each waits for
    its buffer before its body is read; uvicorn stops reading a body nobody reads)."""
    dims = "256,64,256"  # 1024 rows: 1 MiB in, 1 MiB out
    args = ["--backend", "host", "--max-mib", "4", "--dims", dims, "--streams", "2",
            "--admit-timeout", "300"]  # fmt: skip
    ((body, expected),) = bench_server.make_payloads([256, 64, 256], 0, 1024, 1)
    async with bench_server.server_process("pinned", args) as running:
        peaks = []
        for n in (100, 400):
            answers = await asyncio.gather(*(upload(running.url, body) for _ in range(n)))
            assert all(status == 200 for status, _ in answers)
            for _, content in answers[:: n // 10]:
                bench_server.check_answer(content, expected)
            async with httpx.AsyncClient(base_url=running.url) as client:
                stats = (await client.get("/stats")).json()
            peaks.append(stats["server"]["peak_rss_bytes"])
            assert stats["pool"]["peak_reserved_bytes"] <= 4 * MiB
            assert stats["server"]["ok"] == (100 if n == 100 else 500)
    per_connection = (peaks[1] - peaks[0]) / 300
    assert per_connection < 0.25 * MiB, f"{per_connection / MiB:.3f} MiB per extra connection"


async def test_a_request_that_gets_no_buffer_in_time_is_told_to_retry() -> None:
    rows = 256  # 32 KiB in, 16 KiB out: two requests fill a 96 KiB cap
    async with bench_server.serving(argv(96, 2, admit_s=0.2)) as (server, url):
        body, _ = payload(rows)
        with held_streams(server):
            holders = [await open_raw(url) for _ in range(2)]
            for _, writer in holders:
                writer.write(head(len(body)) + body)
            await until(lambda: server.counters["in_flight"] == 2)
            reader, writer = await open_raw(url)
            writer.write(head(len(body)) + body)
            status, headers, _ = await read_answer(reader)
            assert (status, headers["retry-after"], headers["connection"]) == (503, "1", "close")
            assert await reader.read() == b""  # and the connection is closed
            for _, w in [*holders, (reader, writer)]:
                w.close()
        assert server.counters["refused"] == 1
        await until(lambda: server.pool.stats().active_bytes == 0)


async def test_a_body_that_stalls_is_dropped_with_408_and_its_buffer_comes_back() -> None:
    async with bench_server.serving([*argv(256, 2), "--read-timeout", "0.3"]) as (server, url):
        body, _ = payload(64)
        reader, writer = await open_raw(url)
        writer.write(head(len(body)) + body[: len(body) // 2])  # then nothing more
        status, headers, _ = await read_answer(reader)
        assert (status, headers["connection"]) == (408, "close")
        assert await reader.read() == b""
        writer.close()
        await until(lambda: server.pool.stats().active_bytes == 0)
        assert server.counters["rejected"] == 1


@pytest.mark.parametrize("http", ["h11", "httptools"])
@pytest.mark.parametrize("sends", [b"", b"POST /infer HTTP/1.1\r\nHost:"])
async def test_a_silent_or_stalled_connection_is_closed(http: str, sends: bytes) -> None:
    """A connection that sends nothing, or stops inside its request head, is closed after the
    idle timeout (uvicorn alone would keep both open forever)."""
    async with bench_server.serving([*argv(256, 2), "--idle-timeout", "0.3"], http=http) as (
        _,
        url,
    ):
        reader, writer = await open_raw(url)
        writer.write(sends)
        with anyio.fail_after(10):
            assert await reader.read() == b""  # closed by the server
        writer.close()


async def test_shutdown_with_requests_in_flight_ends_in_bounded_time() -> None:
    """Ctrl-C with requests waiting for buffers and bodies half sent: the server exits within
    its shutdown timeout (plus its own teardown), not when the clients give up."""
    args = [*argv(96, 2, admit_s=300), "--shutdown-timeout", "1"]
    body, _ = payload(256)  # 32 KiB in: a few requests fill the cap, the rest wait
    async with bench_server.server_process("pinned", args) as running:
        conns = [await open_raw(running.url) for _ in range(12)]
        for i, (_, writer) in enumerate(conns):
            writer.write(head(len(body)) + body[: len(body) // 2 if i % 2 else len(body)])
            await writer.drain()
        await anyio.sleep(0.5)  # (let the requests reach the server: waiting or reading)
        t0 = time.monotonic()
        running.process.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            await running.process.wait()
        elapsed = time.monotonic() - t0
        for _, writer in conns:
            writer.close()
    assert elapsed < 6, f"shutdown took {elapsed:.1f} s"


async def test_small_requests_do_not_queue_behind_large_ones() -> None:
    """The main pool is full and a large request waits for it; a small one is admitted at once
    from the lane."""
    async with bench_server.serving(argv(96, 2)) as (server, url):
        large, _ = payload(256)  # 48 KiB with the answer: two fill the cap
        small, expected = payload(1)  # 192 bytes with the answer: the lane's
        with held_streams(server) as gate:
            conns = [await open_raw(url) for _ in range(3)]
            for _, writer in conns:
                writer.write(head(len(large)) + large)
            await until(
                lambda: server.counters["in_flight"] == 2 and server.pool.stats().waiters > 0
            )
            reader, writer = await open_raw(url)
            writer.write(head(len(small)) + small)
            await until(lambda: server.counters["in_flight"] == 3)  # past the waiting large one
            assert server.pool.stats().waiters == 1 and server.lane.stats().active_requests == 1
            gate.set()
            status, _, answer = await read_answer(reader)
            assert status == 200
            bench_server.check_answer(answer, expected)
            for _, w in [*conns, (reader, writer)]:
                w.close()


async def test_the_metrics_endpoint_reports_both_pools() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async with bench_server.serving(argv(256, 2)) as (server, url):
        body, expected = payload(4)  # 768 bytes with the answer: the lane's (up to 1 KiB)
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/infer", content=body)
            bench_server.check_answer(r.raise_for_status().content, expected)
            text = (await client.get("/metrics")).raise_for_status().text
    samples = {
        (s.name, s.labels["pool"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "pool" in s.labels
    }
    lane = server.lane.stats()
    assert samples[("aiopinned_host_allocs_total", "lane")] == lane.num_host_alloc == 1
    assert samples[("aiopinned_max_bytes", "main")] == 256 * 1024
    assert samples[("aiopinned_active_bytes", "main")] == 0


async def test_worker_processes_share_the_budget_and_their_metrics_add_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--workers 2``: two processes, a pool each with half of ``--max-mib``; in
    prometheus_client's multiprocess mode ``/metrics`` (served by either) adds them up."""
    from prometheus_client.parser import text_string_to_metric_families

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    args = [*argv(1024, 2), "--workers", "2"]
    body, expected = payload(64)  # 12 KiB with the answer: the main pools'
    async with (
        bench_server.server_process("pinned", args) as running,
        httpx.AsyncClient(base_url=running.url) as client,
    ):
        for _ in range(20):
            r = await client.post("/infer", content=body)
            bench_server.check_answer(r.raise_for_status().content, expected)
        stats = (await client.get("/stats")).json()  # (one worker's)
        assert stats["pool"]["max_bytes"] == 512 * 1024  # half of the budget

        async def main_pool() -> dict[str, float]:
            text = (await client.get("/metrics")).raise_for_status().text
            return {
                s.name: s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
                if s.labels.get("pool") == "main"
            }

        got: dict[str, float] = {}
        for _ in range(100):  # each worker publishes every second
            got = await main_pool()
            allocations = got.get("aiopinned_cache_hits_total", 0) + got.get(
                "aiopinned_cache_misses_total", 0
            )
            if allocations == 20:
                break
            await anyio.sleep(0.1)
    assert got["aiopinned_max_bytes"] == 1024 * 1024  # both workers' shares
    assert got["aiopinned_active_bytes"] == 0
