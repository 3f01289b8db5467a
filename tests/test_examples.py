"""The examples, driven as their users drive them (host backend, so they run in CI).

The inference server runs under uvicorn on a loopback port and is driven over HTTP (httpx, and a
raw socket for a client that walks away); the prefetch pipeline reads shards from disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
import uvicorn

from aiopinned import PinnedPool

from .conftest import until

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
KB = 1024


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


srv = _load("inference_server")
pipe = _load("prefetch_pipeline")

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's loop


# -- the inference server -------------------------------------------------------------------------
DIMS = {"d_in": 32, "hidden": 48, "d_out": 16}  # in and out of different widths on purpose
MODEL = [32, 48, 48, 16]


def payload(rows: int) -> tuple[bytes, np.ndarray]:
    """A request body of ``rows`` rows for the test model, and the answer it must get."""
    ((body, expected),) = srv.make_payloads(MODEL, 0, rows, 1)
    return body, expected


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>.py`` as a user would; fail with its stderr if it fails."""
    out = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return out


@contextlib.asynccontextmanager
async def serving(http: str = "auto", **config: Any) -> AsyncIterator[tuple[Any, str]]:
    """The example's app under a real uvicorn server on a loopback port."""
    app = srv.create_app(srv.ServerConfig(backend="host", **{**DIMS, **config}))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="on",
                                           log_level="warning", http=http))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app.state.server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.contextmanager
def gated_streams(server: Any) -> Iterator[threading.Event]:
    """Hold every device stream of the server until the event is set (at the latest, on exit:
    a failing test must not leave the server's shutdown waiting on its streams)."""
    gate = threading.Event()
    for stream in server.engine.streams:
        stream.launch(gate.wait)
    try:
        yield gate
    finally:
        gate.set()


async def test_every_answer_is_numerically_right() -> None:
    async with serving(max_bytes=1 << 20) as (_, url):
        for rows in (1, 3, 17):
            report = await srv.run_load(url, concurrency=4, requests=24, rows=rows)
            assert report.requests == 24  # run_load checked each answer against float64
        async with httpx.AsyncClient(base_url=url) as client:
            model = (await client.get("/model")).json()
            assert model["dims"] == MODEL and model["engine"] == "numpy (host)"
            stats = (await client.get("/stats")).json()
    assert stats["server"]["ok"] == 72 and stats["pool"]["active_bytes"] == 0
    assert stats["pool"]["cache_hits"] > 0


def test_the_answer_check_catches_a_wrong_answer() -> None:
    _, expected = payload(5)
    srv.check_answer(expected.astype(np.float32).tobytes(), expected)
    wrong = expected.astype(np.float32)
    wrong[2, 3] += 0.05
    with pytest.raises(AssertionError, match="off by"):
        srv.check_answer(wrong.tobytes(), expected)
    with pytest.raises(AssertionError, match="values"):
        srv.check_answer(wrong.tobytes()[:-4], expected)


async def test_bad_requests_get_a_clear_error_at_once() -> None:
    async with serving(max_bytes=64 * KB) as (_, url), httpx.AsyncClient(base_url=url) as c:
        r = await c.post("/infer", content=b"")
        assert r.status_code == 400 and "float32 rows" in r.text
        r = await c.post("/infer", content=b"\0" * (32 * 4 + 2))
        assert r.status_code == 400
        r = await c.post("/infer", content=b"\0" * (32 * 4 * 1024))  # 128 KiB > the cap
        assert r.status_code == 413 and "cap" in r.text

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: cut off while read
            for _ in range(1024):
                yield b"\0" * (32 * 4)

        r = await c.post("/infer", content=chunks())
        assert r.status_code == 413 and "at most 512" in r.text
        assert (await c.get("/infer")).status_code == 405
        stats = (await c.get("/stats")).json()
    assert stats["server"]["rejected"] == 4 and stats["pool"]["reserved_bytes"] == 0


async def test_overload_waits_for_buffers_instead_of_pinning_more() -> None:
    rows, cap, n = 512, 256 * KB, 48  # 64 KiB in, 32 KiB out; 48 requests at once
    async with serving(max_bytes=cap, streams=4) as (server, url):
        body, expected = payload(rows)
        answers: list[bytes] = []
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

            async def one() -> None:
                r = await client.post("/infer", content=body)
                answers.append(r.raise_for_status().content)

            with gated_streams(server) as gate:  # the first requests hold every block
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(one)
                    await until(lambda: server.counters.in_flight == n, timeout=30)
                    assert server.pool.stats().waiters > 0
                    gate.set()
            stats = (await client.get("/stats")).json()
        assert len(answers) == n
        for content in answers:
            srv.check_answer(content, expected)
        pool = stats["pool"]
        assert pool["num_waits"] > 0  # requests waited for a buffer...
        assert pool["peak_reserved_bytes"] <= cap  # ...instead of pinning past the cap
        await until(lambda: server.pool.stats().active_bytes == 0)
        assert server.pool.stats().waiters == 0


async def _raw_request(url: str, body: bytes, *, send: int | None = None
                       ) -> asyncio.StreamWriter:
    """Open a connection and send a POST /infer (only ``send`` bytes of the body, if given)."""
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    head = (f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    writer.write(head + body[:send])
    await writer.drain()
    return writer


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_clients_that_disconnect_mid_request_leak_nothing(http: str) -> None:
    rows = 256  # 32 KiB in, 16 KiB out: two requests' buffers and a third's input fill the cap
    async with serving(http, max_bytes=128 * KB, streams=2) as (server, url):
        body, expected = payload(rows)
        pool: PinnedPool = server.pool
        with gated_streams(server) as gate:
            await _walk_away(server, url, body, gate)
        s = pool.stats()
        assert (s.active_bytes, s.free_bytes) == (0, s.reserved_bytes)
        assert s.reserved_bytes <= 128 * KB
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/infer", content=body)
        srv.check_answer(r.raise_for_status().content, expected)
        assert server.counters.ok == 1


async def _walk_away(server: Any, url: str, body: bytes, gate: threading.Event) -> None:
    pool: PinnedPool = server.pool
    # Two requests get both their buffers and await the (held) copies; a third waits for a
    # buffer; a fourth never finishes sending its body.
    writers = [await _raw_request(url, body) for _ in range(3)]
    writers.append(await _raw_request(url, body, send=len(body) // 2))
    await until(lambda: server.counters.in_flight == 3 and pool.stats().waiters == 1)
    for w in writers:
        w.close()
    await until(lambda: server.counters.client_gone == 4, timeout=10)
    s = pool.stats()
    assert (s.waiters, server.counters.in_flight) == (0, 0)
    # The copies that read or write the abandoned buffers are still held, so none of their
    # blocks is idle yet: each waits for the event recorded on its stream.
    assert (s.active_requests, s.free_blocks, s.reserved_bytes) == (0, 0, 128 * KB)
    gate.set()
    await until(lambda: pool.stats().pending_events == 0)


def test_the_main_command_runs_server_and_load_client() -> None:
    out = run_example("inference_server", "--backend", "host", "--requests", "60",
                      "--concurrency", "4", "--clients", "2", "--max-mib", "1")
    assert "pinned: 60 requests checked" in out.stdout
    assert "pageable: 60 requests checked" in out.stdout
    assert "ratio" in out.stdout and "0 bytes still held" in out.stdout


# -- the prefetch pipeline ------------------------------------------------------------------------
SHARD = 64 * KB


@pytest.fixture
def dataset(tmp_path: Path) -> Any:
    return pipe.open_dataset(tmp_path / "shards", 12, SHARD, log=lambda _: None)


async def test_the_pipeline_delivers_every_shard_once_in_order(dataset: Any) -> None:
    cap = 3 * SHARD
    async with PinnedPool("host", max_bytes=cap) as pool:
        for _ in range(2):  # the second pass runs on cached blocks
            device = pipe.HostDevice(dataset.count, SHARD, work=1)
            report = await pipe.pinned_pipeline(dataset, pool, device, readers=2)
            assert report.delivered == list(range(12))  # and pinned_pipeline verified the sums
            assert report.waits > 0  # read-ahead was held back by the cap
            s = pool.stats()
            assert s.peak_reserved_bytes <= cap and s.active_bytes == 0
    assert report.compute_busy_s > 0


async def test_read_ahead_stops_at_the_cap_until_copies_finish(dataset: Any) -> None:
    read: list[int] = []
    async with PinnedPool("host", max_bytes=3 * SHARD) as pool:
        device = pipe.HostDevice(dataset.count, SHARD, work=0)
        gate = threading.Event()
        device.copy_stream.launch(gate.wait)  # the copies are held back
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: pipe.pinned_pipeline(
                    dataset, pool, device, readers=2, after_read=lambda i, _: read.append(i)))
                await until(lambda: pool.stats().waiters == 1, timeout=5)
                await anyio.sleep(0.05)
                # Three shards read and handed to copies that have not run: their blocks are
                # not reused, so the reader waits and the shards cannot be overwritten.
                assert sorted(read) == [0, 1, 2] and pool.stats().free_blocks == 0
                gate.set()
        finally:
            gate.set()
    assert sorted(read) == list(range(12))  # and pinned_pipeline verified every checksum


async def test_the_pipeline_catches_a_corrupted_shard(dataset: Any) -> None:
    def corrupt(i: int, buf: Any) -> None:
        if i == 5:
            buf.memoryview()[100] ^= 0xFF

    async with PinnedPool("host", max_bytes=4 * SHARD) as pool:
        device = pipe.HostDevice(dataset.count, SHARD, work=0)
        with pytest.raises(pipe.ChecksumError, match=r"1 shards failed.*\[5\]"):
            await pipe.pinned_pipeline(dataset, pool, device, readers=2, after_read=corrupt)


def test_verify_rejects_a_missing_or_repeated_shard(dataset: Any) -> None:
    sums = list(dataset.checksums)
    pipe.verify(dataset, list(range(12)), sums)
    for delivered in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                      [1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        with pytest.raises(pipe.ChecksumError, match="order"):
            pipe.verify(dataset, delivered, sums)


async def test_the_pageable_baseline_delivers_the_same(dataset: Any) -> None:
    buffers = [np.empty(SHARD, np.uint8) for _ in range(3)]
    device = pipe.HostDevice(dataset.count, SHARD, work=0)
    report = await pipe.pageable_pipeline(dataset, buffers, device, readers=2)
    assert report.delivered == list(range(12))


def test_a_dataset_of_another_shape_is_recreated(dataset: Any) -> None:
    again = pipe.open_dataset(dataset.root, 12, SHARD, log=lambda _: None)
    assert again.checksums == dataset.checksums
    smaller = pipe.open_dataset(dataset.root, 4, 2 * SHARD, log=lambda _: None)
    assert smaller.count == 4 and sorted(p.name for p in dataset.root.glob("shard-*")) == [
        f"shard-{i:05d}.bin" for i in range(4)]
    assert all(smaller.path(i).stat().st_size == 2 * SHARD for i in range(4))
    with pytest.raises(ValueError):
        pipe.open_dataset(dataset.root, 4, 1000)


def test_the_pipeline_command_prints_its_report(tmp_path: Path) -> None:
    out = run_example("prefetch_pipeline", "--backend", "host", "--data", str(tmp_path),
                      "--size-gib", "0.01", "--shard-mib", "1", "--depth", "3")
    assert "checksums verified" in out.stdout and "pageable" in out.stdout


def test_the_quickstart_runs() -> None:
    out = run_example("quickstart")
    assert "200 x 16 MiB staged" in out.stdout and "cache hits" in out.stdout


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (srv, ["--concurrency", "0"], "--concurrency must be >= 1"),
        (srv, ["--concurrency", "2", "--clients", "3"], "--clients must be <= --concurrency"),
        (srv, ["--backend", "host", "--rows", "100000", "--max-mib", "1"], "do not fit"),
        (pipe, ["--backend", "host", "--depth", "2", "--readers", "3"], "--readers <= --depth"),
    ],
)
def test_bad_command_lines_are_refused_at_once(
    module: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        module.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
