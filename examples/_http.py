"""HTTP plumbing for the example server (not its lesson): dropping idle and stalled connections,
reading a body into a buffer under a read timeout, cancelling a request when its client leaves,
and the pools' Prometheus metrics (one process, or several workers in multiprocess mode).

uvicorn drops a keep-alive connection that stays idle between requests (``timeout_keep_alive``),
but holds forever a connection that never sends a request, or stops halfway through its headers.
:func:`protocol` gives uvicorn's own HTTP protocol with that keep-alive timer also armed from the
moment the connection opens and after every piece of an unfinished request head, so such a
connection is closed after the same idle time.  It also tells each request when its connection
is lost (:func:`cancelled_on_disconnect`), even while the request waits for a buffer and has
not read its body: a client that gives up leaves the queue at once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from aiopinned import PinnedPool
from aiopinned.metrics import MultiProcessPublisher, PoolCollector


class Lost:
    """A connection's loss, as its requests see it (in their scope, under ``KEY``)."""

    KEY = "aiopinned.lost"

    def __init__(self) -> None:
        self.happened = False
        self.callbacks: list[Callable[[], object]] = []

    def happen(self) -> None:
        self.happened = True
        for callback in list(self.callbacks):
            callback()


@contextlib.contextmanager
def cancelled_on_disconnect(request: Request) -> Iterator[anyio.CancelScope]:
    """A cancel scope cancelled the moment the client's connection is lost, whatever the
    request is waiting for (a buffer, its body, the device); ``cancel_called`` says so after.
    Served by another protocol than :func:`protocol`'s, it is never cancelled."""
    lost: Lost = request.scope.get(Lost.KEY) or Lost()
    with anyio.CancelScope() as scope:
        lost.callbacks.append(scope.cancel)
        try:
            if lost.happened:
                scope.cancel()
            yield scope
        finally:
            lost.callbacks.remove(scope.cancel)


class BodyError(Exception):
    """The body does not match its ``Content-Length``, or stalled past the read timeout."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_GUARDED: dict[str, type[Any]] = {}


def __getattr__(name: str) -> type[Any]:
    """``GuardedH11Protocol`` / ``GuardedHttpToolsProtocol`` by name, so that uvicorn's worker
    processes can import (and unpickle) the protocol their config names."""
    for http in ("h11", "httptools"):
        if name == protocol(http).__name__:
            return protocol(http)
    raise AttributeError(name)


def protocol(http: str = "auto") -> type[Any]:
    """uvicorn's ``h11`` or ``httptools`` protocol (``auto``: httptools when installed), with
    idle connections dropped before a request as well as between requests."""
    if http == "auto":
        http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if http not in _GUARDED:
        _GUARDED[http] = _guarded(http)
    return _GUARDED[http]


def _guarded(http: str) -> type[Any]:
    module, name = (("h11_impl", "H11Protocol"), ("httptools_impl", "HttpToolsProtocol"))[
        http == "httptools"]  # fmt: skip
    base: Any = getattr(importlib.import_module(f"uvicorn.protocols.http.{module}"), name)

    class Guarded(base):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            self.lost = Lost()
            super().connection_made(transport)
            self._arm_idle_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.lost.happen()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is None or self.cycle.response_complete:  # (still in a request head)
                self._arm_idle_timer()
            else:  # a request began (its task has not run yet): tell it how to hear of a loss
                self.scope.setdefault(Lost.KEY, self.lost)

        def _arm_idle_timer(self) -> None:
            armed = self.timeout_keep_alive_task  # type: ignore[has-type]
            if armed is None and not self.transport.is_closing():
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the pools in ``app.state.pools`` (name -> pool) in Prometheus's text
    format; in its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), every worker's figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        for name, pool in request.app.state.pools.items():
            registry.register(PoolCollector(pool, name=name))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@contextlib.asynccontextmanager
async def publishing(app: Any, pools: dict[str, PinnedPool]) -> AsyncIterator[None]:
    """The ``pools`` that :func:`metrics` reports; in multiprocess mode, this worker's copied to
    the shared files every second."""
    app.state.pools = pools
    async with contextlib.AsyncExitStack() as stack:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            for name, pool in pools.items():
                await stack.enter_async_context(MultiProcessPublisher(pool, name=name))
        yield


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=["serve"], default="serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for name, default, what in (("read", 10.0, "wait for each part of a body, then 408"),
                                ("idle", 5.0, "keep a silent connection open"),
                                ("shutdown", 5, "finish requests on shutdown")):  # fmt: skip
        parser.add_argument(f"--{name}-timeout", type=type(default), default=default, help=what)
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--workers", type=_at_least_one, default=1, help="processes, a pool each")


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def _uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"http": protocol(args.http), "timeout_keep_alive": args.idle_timeout,
            "timeout_graceful_shutdown": args.shutdown_timeout,
            "log_level": args.log_level}  # fmt: skip


def uvicorn_config(app: Any, args: argparse.Namespace, **kw: Any) -> uvicorn.Config:
    """uvicorn's config for ``app``: the guarded protocol and the timeouts of ``args``."""
    return uvicorn.Config(app, **{**_uvicorn_options(args), **kw})


ARGV_ENV = "AIOPINNED_EXAMPLE_ARGV"


def serve(
    args: argparse.Namespace, argv: list[str] | None, make_app: Callable[[], Any], factory: str
) -> None:
    """Serve ``make_app()`` under uvicorn until Ctrl-C; with ``--workers N``, N processes that
    each build their own app (and pools) with ``factory`` (``"module:function"``), which reads
    the command line from the environment (``ARGV_ENV``)."""
    options = {**_uvicorn_options(args), "host": args.host, "port": args.port}
    if args.workers == 1:
        uvicorn.Server(uvicorn.Config(make_app(), **options)).run()
        return
    os.environ[ARGV_ENV] = json.dumps(sys.argv[1:] if argv is None else argv)
    uvicorn.run(factory, factory=True, workers=args.workers, **options)


def argv_from_env() -> list[str]:
    """A worker's command line (see :func:`serve`)."""
    return list(json.loads(os.environ[ARGV_ENV]))


def refuse(counters: Counter[str], status: int, why: str, **headers: str) -> Response:
    """An error answer sent before the body is read, so the connection closes after it."""
    counters["refused" if status == 503 else "rejected"] += 1
    return Response(why, status, headers={"Connection": "close", **headers})


async def read_into(request: Request, view: memoryview, read_timeout: float) -> None:
    """Read the body straight into ``view``, which is its ``Content-Length`` long; each piece
    must arrive within ``read_timeout`` seconds.

    Raises:
        BodyError: 408 for a stalled body, 400 for one longer or shorter than announced.
        starlette.requests.ClientDisconnect: the client left.
    """
    got, pieces = 0, request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(read_timeout):
                piece = await pieces.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise BodyError(408, f"no part of the body came for {read_timeout} s") from None
        if got + len(piece) > len(view):
            raise BodyError(400, f"the body is longer than its Content-Length ({len(view)})")
        view[got : got + len(piece)] = piece
        got += len(piece)
    if got != len(view):
        raise BodyError(400, f"the body ended after {got} of {len(view)} bytes")
