"""The inference server under load: aiopinned's pinned staging against a pageable twin.

    python benchmarks/bench_server.py                  # GPU when torch sees one, else host
    python benchmarks/bench_server.py --dims 1024,8192,8192,8192,8192,1024 --max-mib 16

Runs ``examples/inference_server.py`` as a server process, and its twin that stages in pageable
memory (the same app with ``infer_pageable``), one after the other, and drives each from several
load-client processes that warm up and then start together (one httpx process cannot load a
server).  Every answer is checked against a float64 reference.  Prints throughput, p50 and p99 of
both, and their ratios.

The pageable twin does what a server without pinned memory does: torch's copy from the device
into pageable memory blocks the calling thread until the GPU has run everything queued before it,
so the loop stalls for it; the end of the work is awaited in a worker thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import inference_server as example
from _device import make_weights, mlp_dims, pick_backend, reference
from _http import uvicorn_config

MiB = 1 << 20
OCTETS = "application/octet-stream"
EXAMPLE = Path(example.__file__).resolve()


def max_rows_under(max_bytes: int, dims: Sequence[int]) -> int:
    """The most rows a request may have: its input and its output fit under the cap together,
    in one buffer (the server's own rule)."""
    return max_bytes // (4 * (dims[0] + dims[-1]))


class PageableBody:
    """What a server without a pool stages a body in: a ``bytearray`` made on arrival."""

    def __init__(self, nbytes: int) -> None:
        self.data = bytearray(nbytes)

    def memoryview(self) -> memoryview:
        return memoryview(self.data)

    async def __aenter__(self) -> PageableBody:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


async def admit_pageable(server: example.Server, nbytes: int, timeout: float) -> PageableBody:
    """No ticket: every request is admitted at once, as without a pool."""
    return PageableBody(nbytes)


async def infer_pageable(server: example.Server, body: PageableBody, rows: int) -> bytes:
    """The example's ``infer`` with pageable staging buffers: the baseline."""
    device, (d_in, *_, d_out) = server.device, server.dims
    stream = random.choice(server.streams)
    inp = device.pageable("float32", (rows, d_in))
    device.numpy(inp)[...] = np.frombuffer(body.data, np.float32, rows * d_in).reshape(rows, d_in)
    x = device.to_device(stream, inp)
    y = device.mlp(stream, x, server.weights)
    out = device.pageable("float32", (rows, d_out))
    device.to_host(stream, y, out)  # torch: blocks the loop until the stream gets here
    await anyio.to_thread.run_sync(device.synchronize, stream)
    return device.numpy(out).tobytes()


# -- payloads and answers -------------------------------------------------------------------------
def make_payloads(
    dims: Sequence[int], seed: int, rows: int, count: int
) -> list[tuple[bytes, np.ndarray]]:
    """``count`` request bodies of ``rows`` rows, each with the answer it must get."""
    weights = make_weights(dims, seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for _ in range(count):
        x = rng.standard_normal((rows, dims[0])).astype(np.float32)
        out.append((x.tobytes(), reference(x, weights).astype(np.float32)))
    return out


def check_answer(content: bytes, expected: np.ndarray) -> None:
    """Raise ``AssertionError`` unless ``content`` is ``expected`` to float32 matmul precision."""
    got = np.frombuffer(content, np.float32)
    if got.size != expected.size:
        raise AssertionError(f"answer has {got.size} values, expected {expected.size}")
    err = np.max(np.abs(got.reshape(expected.shape) - expected))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if not err <= 1e-3 * scale:
        raise AssertionError(f"answer is off by {err:.3g} (scale {scale:.3g})")


def save_payloads(path: str, dims: Sequence[int], seed: int, rows: int, count: int) -> None:
    """``make_payloads``, written to ``path`` for the client processes to load."""
    payloads = make_payloads(dims, seed, rows, count)
    bodies = [np.frombuffer(b, np.uint8) for b, _ in payloads]
    np.savez(path, *bodies, *[expected for _, expected in payloads])


def load_payloads(path: str) -> list[tuple[bytes, np.ndarray]]:
    with np.load(path) as f:
        arrays = [f[f"arr_{i}"] for i in range(len(f.files))]
    half = len(arrays) // 2
    return [(a.tobytes(), e) for a, e in zip(arrays[:half], arrays[half:], strict=True)]


# -- the load client ------------------------------------------------------------------------------
@dataclass
class LoadReport:
    requests: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    request_bytes: int = 0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


async def run_load(
    url: str,
    *,
    concurrency: int,
    requests: int,
    rows: int,
    warmup: int = 0,
    payloads: list[tuple[bytes, np.ndarray]] | None = None,
    before: Callable[[], Awaitable[object]] | None = None,
) -> LoadReport:
    """Drive ``url`` with ``concurrency`` connections; check every answer numerically.

    ``payloads`` (bodies and expected answers) are made from the server's model unless given.
    ``warmup`` requests are sent first and not measured; then ``before()`` is awaited (a start
    signal shared by several client processes), then ``requests`` are measured.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        if payloads is None:
            model = (await client.get("/stats")).raise_for_status().json()["model"]
            payloads = await anyio.to_thread.run_sync(
                make_payloads, model["dims"], model["seed"], rows, 4
            )
        latencies: list[float] = []

        async def one_client(turn: itertools.count[int], total: int, record: bool) -> None:
            while (i := next(turn)) < total:
                body, expected = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                r = await client.post("/infer", content=body, headers={"content-type": OCTETS})
                t1 = time.perf_counter()
                r.raise_for_status()
                check_answer(r.content, expected)
                if record:
                    latencies.append((t1 - t0) * 1e3)

        seconds = 0.0
        for total, record in ((warmup, False), (requests, True)):
            if record and before is not None:
                await before()
            turn = itertools.count()
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(one_client, turn, total, record)
            seconds = time.perf_counter() - t0
    return LoadReport(len(latencies), seconds, latencies, len(payloads[0][0]))


def client_process(args: argparse.Namespace) -> None:
    """One load-client process: warm up, say ``ready``, wait for ``go``, run, print JSON."""

    async def wait_for_go() -> None:
        print("ready", flush=True)
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit("load client: no start signal")

    payloads = load_payloads(args.payloads)

    async def run() -> LoadReport:
        return await run_load(
            args.url,
            concurrency=args.concurrency,
            requests=args.requests,
            rows=args.rows,
            warmup=args.warmup,
            payloads=payloads,
            before=wait_for_go,
        )

    print(json.dumps(asdict(anyio.run(run))), flush=True)


@dataclass
class Group:
    """Load-client processes that send bodies of one size (``payloads``, an ``.npz``)."""

    processes: int
    concurrency: int
    requests: int
    rows: int
    warmup: int
    payloads: str


async def run_clients(url: str, groups: Sequence[Group]) -> list[LoadReport]:
    """``run_load`` spread over client processes, one set per group, that start measuring
    together; a report per group."""
    from anyio.streams.buffered import BufferedByteReceiveStream

    def share(total: int, k: int, n: int) -> int:
        return total * (k + 1) // n - total * k // n

    procs, owner = [], []
    for g, group in enumerate(groups):
        for k in range(group.processes):
            c, r = (
                share(group.concurrency, k, group.processes),
                share(group.requests, k, group.processes),
            )
            argv = ["load", "--url", url, "--concurrency", str(c), "--requests", str(r),
                    "--rows", str(group.rows), "--payloads", group.payloads,
                    "--warmup", str(max(c, group.warmup * c // group.concurrency))]  # fmt: skip
            procs.append(await anyio.open_process([sys.executable, __file__, *argv], stderr=None))
            owner.append(g)
    try:
        outs = [BufferedByteReceiveStream(p.stdout) for p in procs]  # type: ignore[arg-type]
        for out in outs:
            if await out.receive_until(b"\n", 1 << 10) != b"ready":
                raise RuntimeError("a load client did not get ready")
        for p in procs:
            await p.stdin.send(b"go\n")  # type: ignore[union-attr]
        reports = [json.loads(await out.receive_until(b"\n", 1 << 26)) for out in outs]
    finally:
        for p in procs:
            with anyio.move_on_after(10):
                await p.wait()
            if p.returncode is None:
                p.kill()
    merged = []
    for g in range(len(groups)):
        mine = [r for r, o in zip(reports, owner, strict=True) if o == g]
        latencies = [x for r in mine for x in r["latencies_ms"]]
        seconds = max(r["seconds"] for r in mine)
        merged.append(LoadReport(len(latencies), seconds, latencies, mine[0]["request_bytes"]))
    return merged


# -- servers --------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def serving(
    argv: list[str],
    infer: example.Infer = example.infer,
    http: str = "auto",
    admit: example.Admit = example.admit,
) -> AsyncIterator[tuple[example.Server, str]]:
    """The example's app, configured by its command line ``argv``, under uvicorn in this
    process on a free loopback port: its state and its URL.  For tests and profilers: here the
    server's device streams can be held and its pool looked at."""
    import uvicorn

    args = example.parse_args([*argv, "--http", http, "--log-level", "warning"])
    app = example.create_app(args, infer, admit)
    server = uvicorn.Server(uvicorn_config(app, args, host="127.0.0.1", port=0))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app.state.server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Running:
    """A server process and its URL."""

    url: str
    process: anyio.abc.Process


@contextlib.asynccontextmanager
async def server_process(memory: str, argv: list[str]) -> AsyncIterator[Running]:
    """The example server (``pinned``) or its pageable twin as a process, once it answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    serve = [str(EXAMPLE)] if memory == "pinned" else [__file__, "serve-pageable"]
    cmd = [sys.executable, *serve, "serve", "--port", str(port), "--log-level", "warning", *argv]
    proc = await anyio.open_process(cmd, stdout=None, stderr=None)
    try:
        deadline = time.monotonic() + 120
        async with httpx.AsyncClient(base_url=url) as client:
            while True:
                if proc.returncode is not None:
                    raise RuntimeError(f"the server exited with status {proc.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/stats")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not come up")
                await anyio.sleep(0.1)
        yield Running(url, proc)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down, the pool closes
        with anyio.move_on_after(30) as scope:
            await proc.wait()
        if scope.cancelled_caught:
            proc.kill()
            await proc.wait()


Round = dict[str, LoadReport]  # "uniform", "mixed small", "mixed large"


async def bench(args: argparse.Namespace) -> None:
    """Both servers run side by side; rounds alternate which goes first, and each round drives
    each server with the uniform load, then the mixed one (small requests while large flow)."""
    import httpx

    server_argv = ["--backend", args.backend, "--max-mib", str(args.max_mib), "--admit-timeout",
                   "600", "--streams", str(args.streams), "--dims",
                   ",".join(map(str, args.dims))]  # fmt: skip
    rounds: dict[str, list[Round]] = {"pinned": [], "pageable": []}
    with tempfile.TemporaryDirectory(prefix="aiopinned-load-") as tmp:
        large, small = os.path.join(tmp, "large.npz"), os.path.join(tmp, "small.npz")
        async with (
            server_process("pinned", server_argv) as pinned,
            server_process("pageable", server_argv) as pageable,
            httpx.AsyncClient(base_url=pinned.url) as client,
        ):
            model = (await client.get("/stats")).json()["model"]
            for path, rows in ((large, args.rows), (small, args.small_rows)):
                await anyio.to_thread.run_sync(
                    save_payloads, path, model["dims"], model["seed"], rows, 4
                )
            uniform = Group(args.clients, args.concurrency, args.requests, args.rows, args.warmup,
                            large)  # fmt: skip
            small_clients = max(1, args.clients // 4)
            mixed = [
                Group(max(1, args.clients - small_clients), args.concurrency, args.requests,
                      args.rows, args.warmup, large),
                Group(small_clients, args.small_concurrency, args.small_requests,
                      args.small_rows, args.small_concurrency, small),
            ]  # fmt: skip
            for r in range(args.rounds):
                order = [("pinned", pinned), ("pageable", pageable)][:: 1 if r % 2 == 0 else -1]
                for memory, running in order:
                    (u,) = await run_clients(running.url, [uniform])
                    big, little = await run_clients(running.url, mixed)
                    rounds[memory].append({"uniform": u, "mixed small": little, "mixed large": big})
                    print(f"round {r + 1} {memory:>8}: {u.requests} + {big.requests} + "
                          f"{little.requests} answers checked; uniform {u.rps:,.0f} req/s, p99 "
                          f"{u.pct(99):.1f} ms; mixed: small p99 {little.pct(99):.1f} ms, "
                          f"large {big.rps:,.0f} req/s", flush=True)  # fmt: skip
            stats = (await client.get("/stats")).json()
    print_report(args, model, rounds, stats)


def _span(values: Sequence[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def print_report(
    args: argparse.Namespace,
    model: dict[str, Any],
    rounds: dict[str, list[Round]],
    stats: dict[str, Any],
) -> None:
    pin, page = rounds["pinned"], rounds["pageable"]
    mb = pin[0]["uniform"].request_bytes / MiB
    print(
        f"\n{model['engine']}, MLP {model['dims']}, {args.rows} rows = {mb:.2f} MiB in per "
        f"request, {args.concurrency} connections from {args.clients} client processes, pool "
        f"cap {args.max_mib} MiB; {args.rounds} rounds, alternating which server goes first "
        f"(ranges over the rounds; ratios are per round)"
    )
    if "host" in model["engine"]:
        print(
            "(host backend: both servers stage in ordinary memory and no bus is crossed, so "
            "this compares the code paths only)"
        )
    rows: list[tuple[str, str, Callable[[LoadReport], float], bool]] = [
        ("uniform: req/s", "uniform", lambda r: r.rps, True),
        ("uniform: p50 ms", "uniform", lambda r: r.pct(50), False),
        ("uniform: p99 ms", "uniform", lambda r: r.pct(99), False),
        (
            f"mixed: small ({args.small_rows} rows) p99 ms",
            "mixed small",
            lambda r: r.pct(99),
            False,
        ),
        ("mixed: large req/s", "mixed large", lambda r: r.rps, True),
        ("mixed: small req/s", "mixed small", lambda r: r.rps, True),
    ]
    print(f"{'':>32} {'pinned':>14} {'pageable':>14} {'pinned better by':>17}")
    for name, key, get, higher in rows:
        ours, theirs = [get(x[key]) for x in pin], [get(x[key]) for x in page]
        better = [a / b if higher else b / a for a, b in zip(ours, theirs, strict=True)]
        print(f"{name:>32} {_span(ours, ',.1f'):>14} {_span(theirs, ',.1f'):>14} "
              f"{_span(better, '.2f') + 'x':>17}")  # fmt: skip
    for name in ("pool", "lane"):
        pool = stats[name]
        print(
            f"{name}: peak reserved {pool['peak_reserved_bytes'] / MiB:.2f} of "
            f"{pool['max_bytes'] / MiB:.2f} MiB, {pool['num_host_alloc']} blocks pinned, "
            f"{pool['cache_hits']:,} cache hits, {pool['num_waits']:,} requests waited for a "
            f"buffer (longest {pool['wait_time_us_max'] / 1e3:.1f} ms), "
            f"{pool['active_bytes']} bytes still held"
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-pageable"]:  # the pageable twin, as a server process
        example.main(argv[1:], infer=infer_pageable, admit=admit_pageable)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("bench", "load"), default="bench")
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    parser.add_argument("--max-mib", type=float, default=16, help="the pool's cap (MiB)")
    parser.add_argument("--streams", type=int, default=8, help="device streams")
    parser.add_argument("--dims", help="the model's layer widths (default by device)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections")
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="load-client processes (default: cores but 4, at most 12)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests measured (default 2000 on a GPU, 400 on the host)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="default 4 per connection")
    parser.add_argument(
        "--rows",
        type=int,
        default=0,
        help="rows per request (default 256 on a GPU, 64 on the host)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--small-rows", type=int, default=1, help="mixed load: small requests")
    parser.add_argument("--small-concurrency", type=int, default=8)
    parser.add_argument("--small-requests", type=int, default=0, help="default 100 a connection")
    parser.add_argument("--url", help="load: the server")
    parser.add_argument("--payloads", help="load: request bodies and answers (.npz)")
    args = parser.parse_args(argv)
    if args.mode == "load":
        client_process(args)
        return
    if args.clients is None:
        args.clients = max(1, min(12, (os.cpu_count() or 1) - 4, args.concurrency))
    for name in ("concurrency", "clients", "streams"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.clients > args.concurrency:
        parser.error("--clients must be <= --concurrency")
    args.backend = pick_backend(args.backend)
    gpu = args.backend == "cuda"
    args.dims = [int(d) for d in args.dims.split(",")] if args.dims else mlp_dims(args.backend)
    args.rows = args.rows or (256 if gpu else 64)
    max_rows = max_rows_under(int(args.max_mib * MiB), args.dims)
    if args.rows > max_rows:
        parser.error(
            f"{args.rows} rows do not fit the pool's cap of {args.max_mib} MiB (at most "
            f"{max_rows}): raise --max-mib or lower --rows"
        )
    args.requests = args.requests or (2000 if gpu else 400)
    args.warmup = args.concurrency * 4 if args.warmup is None else args.warmup
    args.small_requests = args.small_requests or 100 * args.small_concurrency
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
