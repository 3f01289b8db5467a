"""An async inference server that stages request and response tensors in pinned buffers.

    python examples/inference_server.py                  # server + load client, pinned vs pageable
    python examples/inference_server.py serve --port 8000   # just the server

A Starlette app on uvicorn serves a small MLP: on torch + CUDA when there is a GPU, in NumPy on the
host backend otherwise.  ``POST /infer`` takes raw float32 rows (``rows x d_in``, little-endian)
and answers raw float32 rows (``rows x d_out``); ``GET /model`` describes the model (so a client
can check answers), ``GET /stats`` returns the pool's and the server's counters as JSON.

Per request (``Server.infer_pinned``):

1. the body is staged in a pool buffer (``async with pool.buffer(...)``), copied to the device
   ``non_blocking`` on a stream, and the buffer is freed at once: ``record_stream`` keeps it from
   being reused until that copy has finished;
2. the model runs on the stream;
3. the result is copied back into a second pool buffer, and ``await pool.synchronize(stream)``
   waits for it without blocking the loop;
4. the answer is sent.

A request never holds one pool buffer while it awaits another: under a cap, requests that each
held an input buffer while waiting for an output buffer could wait on each other forever.  The pool
is capped (``--max-mib``): under overload, requests wait for buffers instead of pinning more.  A
client that disconnects cancels its request, wherever it is; its buffers go back to the pool (once
the copies that use them have finished).

The baseline (``--memory pageable``) is the same server with the staging buffers in ordinary
pageable memory: torch's copy from the device into pageable memory blocks the calling thread until
the GPU has run everything queued before it, so the loop stalls for it; the end of the work is
awaited in a worker thread (``stream.synchronize()``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aiopinned import HostStream, PinnedBuffer, PinnedPool

MiB = 1 << 20
OCTETS = "application/octet-stream"


# -- the model ------------------------------------------------------------------------------------
def make_weights(dims: Sequence[int], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic float32 weights and biases for an MLP with layer widths ``dims``."""
    rng = np.random.default_rng(seed)
    return [
        (
            (rng.standard_normal((a, b)) / math.sqrt(a)).astype(np.float32),
            (rng.standard_normal(b) * 0.1).astype(np.float32),
        )
        for a, b in itertools.pairwise(dims)
    ]


def mlp(x: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The model in NumPy, in ``x``'s precision."""
    h = x
    for i, (w, b) in enumerate(weights):
        h = h @ w
        h += b
        if i < len(weights) - 1:
            np.maximum(h, 0.0, out=h)
    return h


def reference(x: np.ndarray, weights: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The model in float64: what every answer is checked against."""
    return mlp(x.astype(np.float64), weights)


class NumpyEngine:
    """The host backend's device: NumPy math run in order on :class:`HostStream` threads.

    Each "device" step is queued on a stream and runs on the stream's thread, as a CUDA copy or
    kernel runs on the GPU: the loop only queues work and never computes.
    """

    name = "numpy (host)"

    def __init__(self, weights: list[tuple[np.ndarray, np.ndarray]], n_streams: int) -> None:
        self.weights = weights
        self.streams = [HostStream(f"infer-{i}") for i in range(n_streams)]

    def pinned(self, buf: PinnedBuffer, shape: tuple[int, int]) -> np.ndarray:
        return buf.numpy(np.float32, shape)

    def pageable(self, shape: tuple[int, int]) -> np.ndarray:
        return np.empty(shape, np.float32)

    def as_numpy(self, host: np.ndarray) -> np.ndarray:
        return host

    def to_device(self, stream: HostStream, host: np.ndarray) -> np.ndarray:
        dev = np.empty_like(host)
        # Host memory goes by address, as a DMA engine sees it: the queued copy holds no
        # reference that would keep a freed buffer from being reused before the copy has run.
        stream.launch(_copy_by_address, dev, dev.ctypes.data, host.ctypes.data, host.nbytes)
        return dev

    def forward(self, stream: HostStream, x: np.ndarray) -> np.ndarray:
        y = np.empty((x.shape[0], self.weights[-1][0].shape[1]), np.float32)
        stream.launch(self._forward, x, y)
        return y

    def _forward(self, x: np.ndarray, out: np.ndarray) -> None:
        out[...] = mlp(x, self.weights)

    def to_host(self, stream: HostStream, dev: np.ndarray, host: np.ndarray) -> None:
        stream.launch(_copy_by_address, dev, host.ctypes.data, dev.ctypes.data, dev.nbytes)

    def synchronize(self, stream: HostStream) -> None:
        stream.synchronize()


def _copy_by_address(device_array: np.ndarray, dst: int, src: int, nbytes: int) -> None:
    """``memmove``, keeping the engine's own ("device") array alive until it has run."""
    ctypes.memmove(dst, src, nbytes)


class TorchEngine:
    """The MLP on a CUDA device with torch, one of several streams per request."""

    name = "torch (cuda)"

    def __init__(self, weights: list[tuple[np.ndarray, np.ndarray]], n_streams: int) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.weights = [
            (torch.from_numpy(w).to(self.device), torch.from_numpy(b).to(self.device))
            for w, b in weights
        ]
        self.streams = [torch.cuda.Stream(self.device) for _ in range(n_streams)]
        torch.cuda.synchronize(self.device)

    def pinned(self, buf: PinnedBuffer, shape: tuple[int, int]) -> Any:
        return buf.torch(self.torch.float32, shape)

    def pageable(self, shape: tuple[int, int]) -> Any:
        return self.torch.empty(shape, dtype=self.torch.float32)

    def as_numpy(self, host: Any) -> np.ndarray:
        return host.numpy()  # type: ignore[no-any-return]

    def to_device(self, stream: Any, host: Any) -> Any:
        with self.torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def forward(self, stream: Any, x: Any) -> Any:
        torch = self.torch
        with torch.cuda.stream(stream), torch.inference_mode():
            for i, (w, b) in enumerate(self.weights):
                x = torch.addmm(b, x, w)
                if i < len(self.weights) - 1:
                    x = torch.relu_(x)
            return x

    def to_host(self, stream: Any, dev: Any, host: Any) -> None:
        with self.torch.cuda.stream(stream):
            host.copy_(dev, non_blocking=True)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()


# -- the server -----------------------------------------------------------------------------------
@dataclass
class ServerConfig:
    backend: str = "auto"
    memory: str = "pinned"  # or "pageable": the baseline
    max_bytes: int = 16 * MiB
    d_in: int = 0  # 0: a default that suits the backend
    hidden: int = 0
    d_out: int = 0
    layers: int = 2  # hidden layers
    seed: int = 0
    streams: int = 8

    def dims(self, gpu: bool) -> list[int]:
        d_in = self.d_in or (1024 if gpu else 256)
        hidden = self.hidden or (4096 if gpu else 512)
        d_out = self.d_out or d_in
        return [d_in, *([hidden] * self.layers), d_out]

    def max_rows(self, gpu: bool) -> int:
        """The most rows a request may have: its input and its output both fit under the cap."""
        dims = self.dims(gpu)
        return self.max_bytes // (4 * max(dims[0], dims[-1]))


@dataclass
class Counters:
    ok: int = 0
    rejected: int = 0
    client_gone: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0


class Server:
    """The state behind the app: the pool, the model, the streams and the counters."""

    def __init__(self, config: ServerConfig) -> None:
        if config.memory not in ("pinned", "pageable"):
            raise ValueError(f"memory must be 'pinned' or 'pageable', not {config.memory!r}")
        self.config = config
        self.counters = Counters()
        self.pool: PinnedPool | None = None
        self.engine: NumpyEngine | TorchEngine | None = None
        self.dims: list[int] = []
        self.max_rows = 0
        self._turn = itertools.count()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with PinnedPool(self.config.backend, max_bytes=self.config.max_bytes) as pool:
            gpu = pool.backend == "cuda"
            if gpu and not _torch_installed():
                raise RuntimeError("the cuda backend needs torch for the model; install torch, "
                                   "or run with --backend host")
            self.dims = self.config.dims(gpu)
            self.max_rows = self.config.max_rows(gpu)
            weights = make_weights(self.dims, self.config.seed)
            engine_type = TorchEngine if gpu else NumpyEngine
            self.engine = await anyio.to_thread.run_sync(engine_type, weights, self.config.streams)
            self.pool = pool
            try:
                yield
            finally:
                self.pool = None

    # -- one request, two ways ------------------------------------------------------------------
    async def infer_pinned(self, body: bytes | bytearray, rows: int) -> bytes:
        pool, engine = self._parts()
        d_in, d_out = self.dims[0], self.dims[-1]
        stream = self._next_stream(engine)
        async with pool.buffer(len(body)) as inp:
            inp.memoryview()[:] = body
            x = engine.to_device(stream, engine.pinned(inp, (rows, d_in)))
            inp.record_stream(stream)  # reused only once the copy to the device is done
        y = engine.forward(stream, x)
        del x
        async with pool.buffer(rows * d_out * 4) as out:
            engine.to_host(stream, y, engine.pinned(out, (rows, d_out)))
            del y
            try:
                await pool.synchronize(stream)
            except BaseException:  # cancelled (the client left) with the copy in flight:
                out.record_stream(stream)  # the block is reused only once the copy is done
                raise
            # The copy is done: freed without a stream, the block is idle at once, instead of
            # waiting for whatever other requests have queued on the stream since.
            return bytes(out.memoryview())

    async def infer_pageable(self, body: bytes | bytearray, rows: int) -> bytes:
        _, engine = self._parts()
        d_in, d_out = self.dims[0], self.dims[-1]
        stream = self._next_stream(engine)
        inp = engine.pageable((rows, d_in))
        memoryview(engine.as_numpy(inp)).cast("B")[:] = body
        x = engine.to_device(stream, inp)
        y = engine.forward(stream, x)
        out = engine.pageable((rows, d_out))
        engine.to_host(stream, y, out)  # torch: blocks until the stream gets here
        await anyio.to_thread.run_sync(engine.synchronize, stream)
        return engine.as_numpy(out).tobytes()

    def _next_stream(self, engine: NumpyEngine | TorchEngine) -> Any:
        return engine.streams[next(self._turn) % len(engine.streams)]

    def _parts(self) -> tuple[PinnedPool, NumpyEngine | TorchEngine]:
        if self.pool is None or self.engine is None:
            raise RuntimeError("the server is not running")
        return self.pool, self.engine

    # -- HTTP -----------------------------------------------------------------------------------
    async def handle_infer(self, request: Request) -> Response:
        c = self.counters
        d_in = self.dims[0]
        limit = self.max_rows * 4 * d_in
        if int(request.headers.get("content-length") or 0) > limit:
            return self._too_big()
        body = bytearray()
        try:
            async for chunk in request.stream():  # bounded even without a Content-Length
                body += chunk
                if len(body) > limit:
                    return self._too_big()
        except ClientDisconnect:
            c.client_gone += 1
            return Response(status_code=499)
        if not body or len(body) % (4 * d_in):
            c.rejected += 1
            return Response(
                f"the body must be a whole number (>= 1) of {d_in} float32 rows "
                f"({4 * d_in} bytes each); got {len(body)} bytes\n",
                status_code=400,
            )
        rows = len(body) // (4 * d_in)
        infer = self.infer_pinned if self.config.memory == "pinned" else self.infer_pageable
        c.in_flight += 1
        c.peak_in_flight = max(c.peak_in_flight, c.in_flight)
        try:
            answer = await _cancel_on_disconnect(request, infer(body, rows))
        finally:
            c.in_flight -= 1
        if answer is None:
            c.client_gone += 1
            return Response(status_code=499)
        c.ok += 1
        return Response(answer, media_type=OCTETS, headers={"x-rows": str(rows)})

    def _too_big(self) -> Response:
        self.counters.rejected += 1
        return Response(f"more rows than fit the pool's cap of {self.config.max_bytes} bytes "
                        f"(at most {self.max_rows})\n", status_code=413)

    async def handle_model(self, request: Request) -> Response:
        engine = self.engine
        return JSONResponse({
            "dims": self.dims,
            "seed": self.config.seed,
            "engine": None if engine is None else engine.name,
            "memory": self.config.memory,
            "max_bytes": self.config.max_bytes,
        })

    async def handle_stats(self, request: Request) -> Response:
        pool = self.pool
        return JSONResponse({
            "pool": None if pool is None else pool.stats().as_dict(),
            "server": asdict(self.counters),
        })


async def _cancel_on_disconnect(request: Request, work: Any) -> Any:
    """Run ``work``; if the client disconnects first, cancel it and return ``None``.

    Once the body has been read, the next ASGI message is ``http.disconnect``; uvicorn delivers
    it when the connection drops (or after the response is complete, when nobody is listening).
    """
    result = None

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, tg.cancel_scope)
        try:
            result = await work
        finally:
            tg.cancel_scope.cancel()
    return result


def create_app(config: ServerConfig) -> Starlette:
    server = Server(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with server.running():
            yield

    app = Starlette(
        routes=[
            Route("/infer", server.handle_infer, methods=["POST"]),
            Route("/model", server.handle_model, methods=["GET"]),
            Route("/stats", server.handle_stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.server = server
    return app


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


def make_payloads(dims: Sequence[int], seed: int, rows: int, count: int
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
    np.savez(path, *[np.frombuffer(b, np.uint8) for b, _ in payloads],
             *[expected for _, expected in payloads])


def load_payloads(path: str) -> list[tuple[bytes, np.ndarray]]:
    with np.load(path) as f:
        arrays = [f[f"arr_{i}"] for i in range(len(f.files))]
    half = len(arrays) // 2
    return [(a.tobytes(), e) for a, e in zip(arrays[:half], arrays[half:], strict=True)]


async def run_load(url: str, *, concurrency: int, requests: int, rows: int, warmup: int = 0,
                   payloads: list[tuple[bytes, np.ndarray]] | None = None,
                   before: Callable[[], Awaitable[object]] | None = None) -> LoadReport:
    """Drive ``url`` with ``concurrency`` connections; check every answer numerically.

    ``payloads`` (bodies and expected answers) are made from the server's ``/model`` unless
    given.  ``warmup`` requests are sent first and not measured; then ``before()`` is awaited (a
    start signal shared by several client processes), then ``requests`` are measured.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        if payloads is None:
            model = (await client.get("/model")).raise_for_status().json()
            payloads = await anyio.to_thread.run_sync(
                make_payloads, model["dims"], model["seed"], rows, 4)
        latencies: list[float] = []
        turn = itertools.count()

        async def one_client(total: int, record: bool) -> None:
            while (i := next(turn)) < total:
                body, expected = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                r = await client.post("/infer", content=body, headers={"content-type": OCTETS})
                t1 = time.perf_counter()
                r.raise_for_status()
                check_answer(r.content, expected)
                if record:
                    latencies.append((t1 - t0) * 1e3)

        for total, record in ((warmup, False), (requests, True)):
            if record and before is not None:
                await before()
            turn = itertools.count()
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(concurrency):
                    tg.start_soon(one_client, total, record)
            seconds = time.perf_counter() - t0
    return LoadReport(len(latencies), seconds, latencies, len(payloads[0][0]))


def client_process(args: argparse.Namespace) -> None:
    """One load-client process (``load`` mode): warm up, say ``ready``, wait for ``go``, run,
    and print its report as JSON."""

    async def wait_for_go() -> None:
        print("ready", flush=True)
        line = await anyio.to_thread.run_sync(sys.stdin.readline)
        if line.strip() != "go":
            raise SystemExit("load client: no start signal")

    payloads = load_payloads(args.payloads) if args.payloads else None
    report = anyio.run(lambda: run_load(args.url, concurrency=args.concurrency,
                                        requests=args.requests, rows=args.rows,
                                        warmup=args.warmup, payloads=payloads,
                                        before=wait_for_go))
    print(json.dumps(asdict(report)), flush=True)


async def run_clients(url: str, *, processes: int, concurrency: int, requests: int, rows: int,
                      warmup: int, payloads: str) -> LoadReport:
    """``run_load`` spread over client processes that start measuring together.

    One Python process cannot drive a server faster than httpx and the answer checks run in it,
    so the load comes from several, each with its share of the connections and requests, all
    sending the bodies saved in the file ``payloads``.
    """
    from anyio.streams.buffered import BufferedByteReceiveStream

    share = [(concurrency * (k + 1) // processes - concurrency * k // processes,
              requests * (k + 1) // processes - requests * k // processes)
             for k in range(processes)]
    procs = [
        await anyio.open_process(
            [sys.executable, os.path.abspath(__file__), "load", "--url", url,
             "--concurrency", str(c), "--requests", str(r), "--rows", str(rows),
             "--warmup", str(max(c, warmup * c // concurrency)), "--payloads", payloads],
            stderr=None)
        for c, r in share
    ]
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
    latencies = [x for r in reports for x in r["latencies_ms"]]
    return LoadReport(len(latencies), max(r["seconds"] for r in reports), latencies,
                      reports[0]["request_bytes"])


# -- the command line -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_argv(args: argparse.Namespace, memory: str, port: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "serve", "--port", str(port),
            "--memory", memory, "--backend", args.backend, "--max-mib", str(args.max_mib),
            "--streams", str(args.streams), "--dim", str(args.dim), "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--log-level", "warning"]


async def _wait_ready(url: str, proc: anyio.abc.Process, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url) as client:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the server exited with status {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/model")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up")
            await anyio.sleep(0.1)


async def bench(args: argparse.Namespace) -> None:
    import httpx

    results = {}
    tmp = tempfile.TemporaryDirectory(prefix="aiopinned-load-")
    payloads = os.path.join(tmp.name, "payloads.npz")
    try:
        for memory in ("pinned", "pageable"):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = await anyio.open_process(_serve_argv(args, memory, port), stdout=None,
                                            stderr=None)
            try:
                await _wait_ready(url, proc)
                async with httpx.AsyncClient(base_url=url) as client:
                    model = (await client.get("/model")).json()
                if not os.path.exists(payloads):  # the same model on both servers
                    await anyio.to_thread.run_sync(
                        save_payloads, payloads, model["dims"], model["seed"], args.rows, 4)
                report = await run_clients(url, processes=args.clients,
                                           concurrency=args.concurrency, requests=args.requests,
                                           rows=args.rows, warmup=args.warmup, payloads=payloads)
                async with httpx.AsyncClient(base_url=url) as client:
                    stats = (await client.get("/stats")).json()
            finally:
                proc.send_signal(signal.SIGINT)  # uvicorn shuts down, the pool closes
                with anyio.move_on_after(30) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    proc.kill()
                    await proc.wait()
            results[memory] = (report, stats)
            print(f"{memory:>8}: {report.requests} requests checked, {report.rps:,.0f} req/s, "
                  f"p50 {report.pct(50):.2f} ms, p99 {report.pct(99):.2f} ms", flush=True)
    finally:
        tmp.cleanup()

    pin, page = results["pinned"][0], results["pageable"][0]
    pool = results["pinned"][1]["pool"]
    mb = pin.request_bytes / MiB
    print(f"\n{model['engine']}, MLP {model['dims']}, {args.rows} rows = {mb:.2f} MiB "
          f"in and out per request, {args.concurrency} connections from {args.clients} client "
          f"process{'es' if args.clients > 1 else ''}, pool cap {args.max_mib} MiB")
    if args.backend == "host":
        print("(host backend: both servers stage in ordinary memory and no bus is crossed, so this "
              "compares the code paths only)")
    print(f"{'':>10} {'req/s':>9} {'MiB/s in':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in (("pinned", pin), ("pageable", page)):
        print(f"{name:>10} {r.rps:>9,.0f} {r.rps * mb:>9,.0f} {r.pct(50):>8.2f} {r.pct(99):>8.2f}")
    print(f"{'ratio':>10} {pin.rps / page.rps:>8.2f}x {'':>9} {page.pct(50) / pin.pct(50):>7.2f}x "
          f"{page.pct(99) / pin.pct(99):>7.2f}x   (pinned better when > 1)")
    print(f"pool: peak reserved {pool['peak_reserved_bytes'] / MiB:.0f} of {args.max_mib} MiB, "
          f"{pool['num_host_alloc']} blocks pinned, {pool['cache_hits']:,} cache hits, "
          f"{pool['num_waits']:,} requests waited for a buffer "
          f"(longest {pool['wait_time_us_max'] / 1e3:.1f} ms), "
          f"{pool['active_bytes']} bytes still held")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("bench", "serve", "load"), default="bench",
                        help="bench (default): server + load client, pinned vs pageable; "
                             "serve: just the server; load: just a load client (--url)")
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    parser.add_argument("--memory", choices=("pinned", "pageable"), default="pinned",
                        help="serve: where the server stages tensors")
    parser.add_argument("--max-mib", type=int, default=16, help="the pool's cap (MiB)")
    parser.add_argument("--streams", type=int, default=8, help="device streams")
    parser.add_argument("--dim", type=int, default=0, help="model input/output width")
    parser.add_argument("--hidden", type=int, default=0,
                        help="hidden layer width (default 4096 on a GPU, 512 on the host)")
    parser.add_argument("--layers", type=int, default=2, help="hidden layers")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="bench, load: concurrent connections")
    parser.add_argument("--clients", type=int, default=None,
                        help="bench: load-client processes sharing them (default: all cores "
                             "but 4, at most 12, at most one per connection)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="load: the server")
    parser.add_argument("--payloads", help="load: request bodies and answers (.npz)")
    parser.add_argument("--requests", type=int, default=0,
                        help="bench: requests measured (default 2000 on a GPU, 400 on the host)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="bench: requests sent first and not measured (default 4 per client)")
    parser.add_argument("--rows", type=int, default=0,
                        help="bench: rows per request (default 256 on a GPU, 64 on the host)")
    args = parser.parse_args(argv)
    if args.clients is None:
        args.clients = max(1, min(12, (os.cpu_count() or 1) - 4, args.concurrency))
    for name in ("max_mib", "streams", "concurrency", "clients", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    config = ServerConfig(backend=args.backend, memory=args.memory, max_bytes=args.max_mib * MiB,
                          d_in=args.dim, hidden=args.hidden, layers=args.layers,
                          streams=args.streams)
    if args.mode == "serve":
        uvicorn.run(create_app(config), host=args.host, port=args.port,
                    log_level=args.log_level, lifespan="on")
        return
    if args.mode == "load":
        client_process(args)
        return
    if args.clients > args.concurrency:
        parser.error("--clients must be <= --concurrency")
    if args.backend == "auto":
        args.backend = "cuda" if _cuda_usable() else "host"
    gpu = args.backend == "cuda"
    args.rows = args.rows or (256 if gpu else 64)
    args.requests = args.requests or (2000 if gpu else 400)
    if args.rows > config.max_rows(gpu):
        parser.error(f"{args.rows} rows do not fit the pool's cap of {args.max_mib} MiB (at most "
                     f"{config.max_rows(gpu)}): raise --max-mib or lower --rows")
    if args.warmup is None:
        args.warmup = args.concurrency * 4
    asyncio.run(bench(args))


def _torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _cuda_usable() -> bool:
    if not _torch_installed():
        return False
    import torch

    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    main()
