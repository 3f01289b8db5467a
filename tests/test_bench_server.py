"""benchmarks/bench_server.py: its helpers as modules, and the example's server under them.

The in-process tests hold the server's device streams (``HostStream`` gates) so that requests are
caught exactly where the test wants them: waiting for a buffer, or awaiting a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from aiopinned import PinnedPool
from benchmarks import bench_server

from .conftest import until

BENCH = Path(bench_server.__file__).resolve()
KB = 1024
DIMS = [32, 48, 48, 16]

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's loop


def payload(rows: int) -> tuple[bytes, np.ndarray]:
    ((body, expected),) = bench_server.make_payloads(DIMS, 0, rows, 1)
    return body, expected


def argv(max_kib: int, streams: int, admit_s: float = 60) -> list[str]:
    return ["--backend", "host", "--max-mib", str(max_kib / 1024), "--dims", "32,48,48,16",
            "--streams", str(streams), "--admit-timeout", str(admit_s)]  # fmt: skip


@contextlib.contextmanager
def held_streams(server: Any) -> Iterator[threading.Event]:
    """Hold every device stream of the server until the event is set (on exit at the latest:
    a failing test must not leave the server's shutdown waiting on its streams)."""
    gate = threading.Event()
    for stream in server.streams:
        stream.launch(gate.wait)
    try:
        yield gate
    finally:
        gate.set()


def test_the_answer_check_catches_a_wrong_answer() -> None:
    _, expected = payload(5)
    bench_server.check_answer(expected.astype(np.float32).tobytes(), expected)
    wrong = expected.astype(np.float32)
    wrong[2, 3] += 0.05
    with pytest.raises(AssertionError, match="off by"):
        bench_server.check_answer(wrong.tobytes(), expected)
    with pytest.raises(AssertionError, match="values"):
        bench_server.check_answer(wrong.tobytes()[:-4], expected)


def test_payloads_survive_the_trip_to_the_client_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "p.npz")
    bench_server.save_payloads(path, DIMS, 3, 7, 2)
    loaded, made = bench_server.load_payloads(path), bench_server.make_payloads(DIMS, 3, 7, 2)
    assert [b for b, _ in loaded] == [b for b, _ in made]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(loaded, made, strict=True))


def test_max_rows_is_the_servers_rule() -> None:
    assert bench_server.max_rows_under(64 * KB, DIMS) == 341  # 32 + 16 float32, one buffer


async def test_overload_waits_for_buffers_instead_of_pinning_more() -> None:
    rows, cap, n = 512, 256 * KB, 48  # 96 KiB a request (in and out); 48 requests at once
    async with bench_server.serving(argv(256, 4)) as (server, url):
        body, expected = payload(rows)
        answers: list[bytes] = []
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one() -> None:
                r = await client.post("/infer", content=body)
                answers.append(r.raise_for_status().content)

            with held_streams(server) as gate:  # the first requests hold every block
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(one)
                    # Each request is in flight (holding blocks its copies use; some wait for
                    # their answer's buffer) or waits for a buffer before it reads its body.
                    await until(
                        lambda: server.counters["in_flight"] + server.pool.stats().waiters >= n,
                        timeout=30,
                    )
                    assert server.pool.stats().waiters > 0
                    gate.set()
            stats = (await client.get("/stats")).json()
        assert len(answers) == n
        for content in answers:
            bench_server.check_answer(content, expected)
        assert stats["pool"]["num_waits"] > 0  # requests waited for a buffer...
        assert stats["pool"]["peak_reserved_bytes"] <= cap  # ...instead of pinning past the cap
        await until(lambda: server.pool.stats().active_bytes == 0)
        assert server.pool.stats().waiters == 0


async def _raw_request(url: str, body: bytes, *, send: int | None = None) -> asyncio.StreamWriter:
    """Open a connection and send a POST /infer (only ``send`` bytes of the body, if given)."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    writer.write(head + body[:send])
    await writer.drain()
    return writer


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_clients_that_disconnect_mid_request_leak_nothing(http: str) -> None:
    rows = 256  # 48 KiB a request (32 in, 16 out): two fill the cap
    async with bench_server.serving(argv(128, 2), http=http) as (server, url):
        body, expected = payload(rows)
        pool: PinnedPool = server.pool
        with held_streams(server) as gate:
            # Two requests get their buffers and await the (held) copies; a third waits for a
            # buffer; so does a fourth, which never sends all of its body.
            writers = [await _raw_request(url, body) for _ in range(2)]
            await until(lambda: server.counters["in_flight"] == 2)
            writers.append(await _raw_request(url, body))
            writers.append(await _raw_request(url, body, send=len(body) // 2))
            await until(lambda: pool.stats().waiters == 2)
            await anyio.sleep(2 * bench_server.example._http.HALF_S)  # (at once: a half-close)
            for w in writers:
                w.close()
            await until(lambda: server.counters["client_gone"] == 4)
            s = pool.stats()
            assert (s.waiters, server.counters["in_flight"]) == (0, 0)
            # The copies that read or write the abandoned buffers are still held, so none of
            # their blocks is idle yet: each waits for the event recorded on its stream.
            assert (s.active_requests, s.free_blocks, s.reserved_bytes) == (0, 0, 96 * KB)
            gate.set()
            await until(lambda: pool.stats().pending_events == 0)
        s = pool.stats()
        assert (s.active_bytes, s.free_bytes, s.reserved_bytes) == (0, 96 * KB, 96 * KB)
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/infer", content=body)
        bench_server.check_answer(r.raise_for_status().content, expected)
        assert server.counters["ok"] == 1


async def test_the_pageable_twin_answers_the_same() -> None:
    twin = {"infer": bench_server.infer_pageable, "admit": bench_server.admit_pageable}
    async with bench_server.serving(argv(64, 2), **twin) as (_, url):  # type: ignore[arg-type]
        report = await bench_server.run_load(url, concurrency=3, requests=12, rows=5)
    assert report.requests == 12 and report.pct(50) > 0


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_the_benchmark_runs_both_servers_and_prints_the_ratio() -> None:
    out = run_bench("--backend", "host", "--requests", "60", "--concurrency", "4",
                    "--clients", "2", "--max-mib", "1", "--rounds", "2",
                    "--small-concurrency", "2", "--small-requests", "10")  # fmt: skip
    assert out.returncode == 0, out.stderr
    for line in ("round 1   pinned: 60 + 60 + 10 answers checked",
                 "round 1 pageable: 60 + 60 + 10 answers checked",
                 "round 2 pageable: 60 + 60 + 10 answers checked",
                 "round 2   pinned: 60 + 60 + 10 answers checked"):  # fmt: skip
        assert line in out.stdout
    assert out.stdout.index("round 2 pageable") < out.stdout.index("round 2   pinned")
    assert "mixed: small (1 rows) p99 ms" in out.stdout and "lane: peak reserved" in out.stdout
    assert out.stdout.count(" 0 bytes still held") == 2  # the pool and the lane


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--concurrency", "0"], "--concurrency must be >= 1"),
     (["--concurrency", "2", "--clients", "3"], "--clients must be <= --concurrency"),
     (["--backend", "host", "--rows", "100000", "--max-mib", "1"], "do not fit")],
)  # fmt: skip
def test_bad_command_lines_are_refused_at_once(args: list[str], message: str) -> None:
    out = run_bench(*args)
    assert out.returncode == 2 and message in out.stderr
