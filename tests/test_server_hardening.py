"""The example server against an adversarial client: trickled bodies, bodies refused while they
are still being sent, empty chunked bodies, half-closed connections, slow request heads, and a
clean Ctrl-C (issue 19)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import anyio
import httpx
import pytest

from benchmarks import bench_server

from .test_bench_server import argv, payload
from .test_server_overload import head, open_raw, read_answer

pytestmark = pytest.mark.anyio
MiB = 1 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # (uvicorn runs on asyncio)


async def test_a_trickled_body_is_dropped_at_its_deadline_not_held_for_ever() -> None:
    """One byte every 0.1 s never stalls past the 0.3 s read timeout, but the whole body must
    come within 0.3 s + its length at --body-min-rate: 0.3 + 16 KiB / 20 KB/s = 1.1 s."""
    args = [*argv(256, 2), "--read-timeout", "0.3", "--body-min-rate", "20000"]
    async with bench_server.serving(args) as (server, url):
        body, _ = payload(128)  # 16 KiB
        reader, writer = await open_raw(url)
        writer.write(head(len(body)))

        async def trickle() -> None:
            for byte in body:
                writer.write(bytes([byte]))
                await anyio.sleep(0.1)

        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle)
            with anyio.fail_after(10):
                status, _, answer = await read_answer(reader)
            tg.cancel_scope.cancel()
        assert (status, b"slower than 20000 bytes/s" in answer) == (408, True)
        assert time.monotonic() - t0 < 3
        writer.close()
        assert server.counters["rejected"] == 1
        assert server.pool.stats().active_bytes == 0


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_a_body_over_the_limit_is_drained_so_the_client_reads_its_413(http: str) -> None:
    async with bench_server.serving(argv(256, 2), http=http) as (server, url):
        body = bytes(4 * MiB)  # far past the 256 KiB cap, and past every socket buffer
        for _ in range(3):
            reader, writer = await open_raw(url)
            writer.write(head(len(body)))

            async def send(w: asyncio.StreamWriter = writer) -> None:
                for off in range(0, len(body), 64 << 10):
                    w.write(body[off : off + (64 << 10)])
                    await w.drain()

            sending = asyncio.ensure_future(send())
            with anyio.fail_after(20):
                status, headers, _ = await read_answer(reader)  # (a reset raises here)
            assert (status, headers["connection"]) == (413, "close")
            await sending
            writer.close()
        assert server.counters["rejected"] == 3


async def test_a_refused_body_past_the_drain_bound_is_not_read_for_ever() -> None:
    args = [*argv(256, 2), "--drain-mib", "1"]
    async with bench_server.serving(args) as (_, url):
        reader, writer = await open_raw(url)
        writer.write(head(64 * MiB) + bytes(2 * MiB))  # 2 MiB sent, then the client stops
        with anyio.fail_after(10):
            status, _, _ = await read_answer(reader)
        assert status == 413
        writer.close()


CHUNKED = b"POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("chunks", "status"), [(b"0\r\n\r\n", 400), (b"4\r\nabcd\r\n0\r\n\r\n", 411)]
)
async def test_a_chunked_body_gets_400_when_empty_and_411_otherwise(
    chunks: bytes, status: int
) -> None:
    async with bench_server.serving(argv(256, 2)) as (_, url):
        reader, writer = await open_raw(url)
        writer.write(CHUNKED + chunks)
        with anyio.fail_after(10):
            got, _, _ = await read_answer(reader)
        assert got == status
        writer.close()


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_a_client_that_half_closes_after_its_request_is_answered(http: str) -> None:
    async with bench_server.serving(argv(256, 2), http=http) as (server, url):
        body, expected = payload(64)

        async def one() -> tuple[int, bytes, bytes]:
            reader, writer = await open_raw(url)
            writer.write(head(len(body)) + body)
            writer.write_eof()  # shutdown(SHUT_WR): the request is whole, the answer awaited
            try:
                status, _, answer = await read_answer(reader)
                return status, answer, await reader.read()  # then the server closes
            finally:
                writer.close()

        with anyio.fail_after(20):
            answers = await asyncio.gather(*(one() for _ in range(10)))
        for status, answer, rest in answers:
            assert (status, rest) == (200, b"")
            bench_server.check_answer(answer, expected)
        assert server.counters["ok"] == 10


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_slow_request_heads_are_closed_within_the_idle_timeout(http: str) -> None:
    """100 connections send their head a byte every 0.1 s (each byte well inside the 0.5 s idle
    timeout): every one is closed once 0.5 s have passed since it opened."""
    async with bench_server.serving([*argv(256, 2), "--idle-timeout", "0.5"], http=http) as (
        _,
        url,
    ):
        text = head(4096)

        async def slow() -> float:
            reader, writer = await open_raw(url)
            t0 = time.monotonic()
            try:
                for byte in text:
                    writer.write(bytes([byte]))
                    with anyio.move_on_after(0.1):
                        if await reader.read() == b"":
                            return time.monotonic() - t0  # closed by the server
                return float("inf")
            finally:
                writer.close()

        with anyio.fail_after(30):
            took = await asyncio.gather(*(slow() for _ in range(100)))
        assert max(took) < 2.0, sorted(took)[-5:]


async def test_ctrl_c_exits_0_with_no_traceback_within_the_shutdown_bound() -> None:
    """SIGINT (Ctrl-C) with a request in flight (its body half sent): the server shuts down
    within --shutdown-timeout (plus its own teardown), prints no traceback and exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(bench_server.EXAMPLE), "serve", "--port", str(port),
           *argv(256, 2), "--shutdown-timeout", "1"]  # fmt: skip
    proc = await anyio.open_process(cmd, stderr=-1)
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            with anyio.fail_after(60):
                while True:
                    try:
                        if (await client.get("/stats")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.1)
        body, _ = payload(256)
        _, writer = await open_raw(url)
        writer.write(head(len(body)) + body[: len(body) // 2])
        await writer.drain()
        await anyio.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            await proc.wait()
        elapsed = time.monotonic() - t0
        writer.close()
        assert proc.stderr is not None
        err = b"".join([chunk async for chunk in proc.stderr]).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.aclose()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Application shutdown complete" in err, err
    assert elapsed < 6, f"shutdown took {elapsed:.1f} s"


def test_the_servers_help_shows_every_default() -> None:
    from benchmarks.bench_server import EXAMPLE

    out = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    text = " ".join(out.stdout.split())
    for default in ("wait for a buffer, then 503 (default: 5)", "then 408 (default: 10.0)",
                    "(default: 1048576.0)", "(default: max-mib/16)", "(default: 8)"):  # fmt: skip
        assert default in text, default
    assert "(default: None)" not in text
