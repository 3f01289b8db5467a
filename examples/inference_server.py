"""An async inference server that stages request and response tensors in pinned buffers.

    python examples/inference_server.py serve --port 8000 --max-mib 16

Starlette on uvicorn serves a small MLP on the GPU through torch (or the host backend's stand-in,
``_device.py``): ``POST /infer`` takes and answers raw float32 rows; ``GET /stats``, ``/health``
(``_tier.py``: a pinned tier brought up while serving).  The lesson is ``handle_infer`` and
``infer``.  One pool buffer, for the body and the answer, is a request's admission ticket: the
request waits for it (``--admit-timeout``, else ``503``), then reads its body straight into it,
so a waiting connection costs no memory and the requests past admission are bounded by the cap.
Small requests have a pool of their own (``--lane-mib``).  ``infer`` copies the input to the
device, runs the model, copies the answer back and awaits ``synchronize`` off the loop.  Gone
clients leave at once, stalled ones are dropped (``_http.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from resource import RUSAGE_SELF, getrusage
from typing import Any

import _http
import _tier
import anyio
from _device import HostDevice, TorchDevice, make_weights, mlp_dims, open_device, pick_backend
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aiopinned import PinnedBuffer, PinnedPool


@dataclass
class Server:
    pool: PinnedPool
    lane: PinnedPool  # small requests only, so that they never queue behind large ones
    device: HostDevice | TorchDevice
    dims: list[int]
    weights: Any
    streams: list[Any]
    counters: Counter[str] = field(default_factory=Counter)  # ok, rejected, client_gone, ...
    tier: _tier.Tier | None = None  # a pinned tier brought up while serving (--tier-gib)


async def infer(server: Server, buf: PinnedBuffer, rows: int) -> bytes:
    """The body is in ``buf``; the answer goes to the rest of it."""
    device, (d_in, *_, d_out) = server.device, server.dims
    stream = random.choice(server.streams)
    both = device.view(buf, "float32", (rows * (d_in + d_out),))
    inp, out = both[: rows * d_in].reshape(rows, d_in), both[rows * d_in :].reshape(rows, d_out)
    try:
        y = device.mlp(stream, device.to_device(stream, inp), server.weights)
        device.to_host(stream, y, out)
        del both, inp, out  # (no view may outlive the request, not even in a traceback)
        await server.pool.synchronize(stream)
    except BaseException:  # failed or cancelled with copies in flight: reuse the block after
        buf.record_stream(stream)
        raise
    return bytes(buf.memoryview()[rows * d_in * 4 :])  # (freed with no stream: idle at once)


async def admit(server: Server, nbytes: int, timeout: float) -> PinnedBuffer:
    pool = server.lane if nbytes <= (server.lane.max_bytes or 0) // 16 else server.pool
    return await pool.allocate(nbytes, timeout=timeout)


Infer = Callable[[Server, Any, int], Awaitable[bytes]]
Admit = Callable[[Server, int, float], Awaitable[Any]]


@contextlib.asynccontextmanager
async def open_server(args: argparse.Namespace) -> AsyncIterator[Server]:
    """The pools (opened on the running loop, closed on leaving), the device and the model."""
    backend = pick_backend(args.backend)
    async with (
        PinnedPool(backend, max_bytes=args.max_bytes) as pool,
        PinnedPool(backend, max_bytes=args.lane_bytes) as lane,
        _tier.bring_up(args, backend) as tier,
    ):
        device = await anyio.to_thread.run_sync(open_device, pool.backend)
        dims = args.dims or mlp_dims(pool.backend)
        weights = await anyio.to_thread.run_sync(make_weights, dims, 0)
        streams = [device.stream() for _ in range(args.streams)]
        yield Server(pool, lane, device, dims, device.load(weights), streams, tier=tier)


async def handle_infer(
    server: Server, request: Request, args: argparse.Namespace, infer: Infer = infer,
    admit: Admit = admit,
) -> Response:  # fmt: skip
    c, (d_in, *_, d_out) = server.counters, server.dims
    row, rows = 4 * d_in, args.max_bytes // (4 * (d_in + d_out))  # rows whose in+out fit
    length = request.headers.get("content-length", "")
    n = int(length) if length.isdigit() else 0
    if not 0 < n <= rows * row or n % row:
        why = f"the body must be float32 rows of {row} bytes, 1 to at most {rows}"
        return await _http.refuse_unread(request, c, 413 if n > rows * row else 400, why, args)
    with _http.cancelled_on_disconnect(request) as scope:
        try:  # the admission ticket: one buffer for the body and the answer
            need = n // row * 4 * (d_in + d_out)
            async with await admit(server, need, args.admit_timeout) as buf:
                rate = args.body_min_rate  # (no view of the buffer may outlive the request)
                await _http.read_into(request, buf.memoryview()[:n], args.read_timeout, rate)
                c["in_flight"] += 1
                try:
                    answer = await infer(server, buf, n // row)
                finally:
                    c["in_flight"] -= 1
        except TimeoutError:  # no buffer in time
            return _http.refuse(c, 503, "busy: try again", **{"Retry-After": args.retry_after})
        except _http.BodyError as e:
            return _http.refuse(c, e.status, str(e))
        except ClientDisconnect:
            scope.cancel()
    if scope.cancel_called:  # the client left, or the server is shutting down
        return _http.ended(request, c)
    c["ok"] += 1
    return Response(answer)


def create_app(args: argparse.Namespace, infer: Infer = infer, admit: Admit = admit) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with open_server(args) as server:
            app.state.server = server
            async with _http.publishing(app, {"main": server.pool, "lane": server.lane}):
                yield  # (publishing: /metrics)

    async def on_infer(request: Request) -> Response:
        return await handle_infer(request.app.state.server, request, args, infer, admit)

    async def handle_stats(request: Request) -> Response:
        server: Server = request.app.state.server
        model = {"dims": server.dims, "seed": 0, "engine": server.device.name}
        peak = {"peak_rss_bytes": getrusage(RUSAGE_SELF).ru_maxrss * 1024}  # (KiB on Linux)
        pools = {k: p.stats().as_dict() for k, p in (("pool", server.pool), ("lane", server.lane))}
        pools["tier"] = server.tier.state() if server.tier else {}
        return JSONResponse({"model": model, **pools, "server": {**server.counters, **peak}})

    routes = [Route("/infer", on_infer, methods=["POST"]), Route("/stats", handle_stats),
              Route("/metrics", _http.metrics), Route("/health", _tier.health)]  # fmt: skip
    return Starlette(routes=routes, lifespan=lifespan)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=_http.HelpWithDefaults
    )
    parser.add_argument("--max-mib", type=float, default=16, help="the pool's cap (MiB)")
    parser.add_argument("--lane-mib", type=float, help="small requests' pool (default: max-mib/16)")
    parser.add_argument("--backend", choices=["auto", "cuda", "host"], default="auto",
                        help="cuda where a GPU is usable, else host")  # fmt: skip
    parser.add_argument("--dims", help="layer widths, e.g. 256,512,512,256 (default: by device)")
    parser.add_argument("--streams", type=int, default=8, help="device streams")
    parser.add_argument("--admit-timeout", type=float, default=5,
                        help="seconds to wait for a buffer, then 503")  # fmt: skip
    _http.add_http_arguments(parser)  # serve, --host, --port, timeouts, --http, --workers
    _tier.add_tier_arguments(parser)  # --tier-gib, --tier-page-kib, --pin-threads
    args = parser.parse_args(argv)
    args.max_bytes = int(args.max_mib * (1 << 20) / args.workers)  # each worker's share
    args.lane_bytes = int((args.lane_mib or args.max_mib / 16) * (1 << 20) / args.workers)
    args.dims = [int(d) for d in args.dims.split(",")] if args.dims else None
    args.retry_after = str(max(1, round(args.admit_timeout)))
    if min(args.max_bytes, args.lane_bytes, args.streams) < 1 or len(args.dims or "ab") < 2:
        parser.error("--max-mib must be > 0, --streams >= 1, and --dims two widths or more")
    return _http.checked(parser, args)


def main(argv: list[str] | None = None, infer: Infer = infer, admit: Admit = admit) -> None:
    args = parse_args(argv)
    _http.serve(args, argv, lambda: create_app(args, infer, admit), "inference_server:from_env")


def from_env() -> Starlette:  # each worker's app, with --workers N
    return create_app(parse_args(_http.argv_from_env()))


if __name__ == "__main__":
    main()
