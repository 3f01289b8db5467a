"""An async inference server that stages request and response tensors in pinned buffers.

    python examples/inference_server.py serve --port 8000 --max-mib 16

A Starlette app on uvicorn serves a small MLP on the GPU through torch (or, with no GPU, on the
host backend's stand-in, ``_device.py``).  ``POST /infer`` takes raw float32 rows and answers raw
float32 rows; ``GET /stats`` gives the model and the pool's and the server's counters.

The lesson is ``infer``: stage the body in a pool buffer, copy it to the device on a stream and
free the buffer at once (``record_stream`` keeps it from reuse until the copy is done); run the
model; copy the answer into a second buffer and ``await pool.synchronize(stream)``, which waits
without blocking the loop.  A request never holds one buffer while it awaits another, so requests
under the cap cannot wait on each other forever; under overload they wait for buffers instead of
pinning more.  ``benchmarks/bench_server.py`` load-tests it against a pageable twin.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from _device import HostDevice, TorchDevice, make_weights, mlp_dims, open_device, pick_backend
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aiopinned import PinnedPool


@dataclass
class Server:
    pool: PinnedPool
    device: HostDevice | TorchDevice
    dims: list[int]
    weights: Any
    streams: list[Any]
    counters: Counter[str] = field(default_factory=Counter)  # ok, rejected, client_gone, ...


async def infer(server: Server, body: bytearray, rows: int) -> bytes:
    pool, device, (d_in, *_, d_out) = server.pool, server.device, server.dims
    stream = random.choice(server.streams)
    async with pool.buffer(len(body)) as inp:
        inp.memoryview()[:] = body
        x = device.to_device(stream, device.view(inp, "float32", (rows, d_in)))
        inp.record_stream(stream)  # reused only once the copy to the device is done
    y = device.mlp(stream, x, server.weights)
    async with pool.buffer(rows * d_out * 4) as out:
        device.to_host(stream, y, device.view(out, "float32", (rows, d_out)))
        try:
            await pool.synchronize(stream)
        except BaseException:  # cancelled with the copy in flight: reuse the block after it
            out.record_stream(stream)
            raise
        return bytes(out.memoryview())  # done: freed with no stream, the block is idle at once


Infer = Callable[[Server, bytearray, int], Awaitable[bytes]]


def create_app(args: argparse.Namespace, infer: Infer = infer) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with PinnedPool(pick_backend(args.backend), max_bytes=args.max_bytes) as pool:
            device = await anyio.to_thread.run_sync(open_device, pool.backend)
            dims = args.dims or mlp_dims(pool.backend)
            weights = await anyio.to_thread.run_sync(make_weights, dims, 0)
            streams = [device.stream() for _ in range(args.streams)]
            app.state.server = Server(pool, device, dims, device.load(weights), streams)
            yield

    async def handle_infer(request: Request) -> Response:
        server: Server = app.state.server
        c, (d_in, *_, d_out) = server.counters, server.dims
        row, limit = 4 * d_in, args.max_bytes // (4 * max(d_in, d_out)) * 4 * d_in  # in+out fit
        length, body = int(request.headers.get("content-length") or 0), bytearray()
        try:
            if length <= limit:
                async for chunk in request.stream():  # bounded even without a Content-Length
                    body += chunk
                    if len(body) > limit:
                        break
        except ClientDisconnect:
            c["client_gone"] += 1
            return Response(status_code=499)
        if max(length, len(body)) > limit:
            c["rejected"] += 1
            return Response(f"more rows than fit the cap (at most {limit // row})", 413)
        if not body or len(body) % row:
            c["rejected"] += 1
            return Response(f"the body must be whole float32 rows of {row} bytes", 400)
        c["in_flight"] += 1
        try:
            answer = await cancel_on_disconnect(request, infer(server, body, len(body) // row))
        finally:
            c["in_flight"] -= 1
        c["ok" if answer is not None else "client_gone"] += 1
        return Response(status_code=499) if answer is None else Response(answer)

    async def handle_stats(request: Request) -> Response:
        server: Server = app.state.server
        model = {"dims": server.dims, "seed": 0, "engine": server.device.name}
        stats = server.pool.stats().as_dict()
        return JSONResponse({"model": model, "pool": stats, "server": dict(server.counters)})

    routes = [Route("/infer", handle_infer, methods=["POST"]), Route("/stats", handle_stats)]
    app = Starlette(routes=routes, lifespan=lifespan)
    return app


async def cancel_on_disconnect(request: Request, work: Awaitable[bytes]) -> bytes | None:
    """``await work``, cancelled (``None``) if the client disconnects first."""
    result = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:  # once the body is read, the next message is a disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        result = await work
        tg.cancel_scope.cancel()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=["serve"], default="serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-mib", type=float, default=16, help="the pool's cap (MiB)")
    parser.add_argument("--backend", choices=["auto", "cuda", "host"], default="auto")
    parser.add_argument("--dims", help="layer widths, e.g. 256,512,512,256 (default by device)")
    parser.add_argument("--streams", type=int, default=8, help="device streams")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    args.max_bytes = int(args.max_mib * (1 << 20))
    args.dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    if args.max_bytes < 1 or args.streams < 1 or (args.dims is not None and len(args.dims) < 2):
        parser.error("--max-mib must be > 0, --streams >= 1, and --dims two widths or more")
    return args


def main(argv: list[str] | None = None, infer: Infer = infer) -> None:
    args = parse_args(argv)
    uvicorn.run(create_app(args, infer), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
