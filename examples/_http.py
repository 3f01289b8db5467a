"""HTTP plumbing for the example server (not its lesson): dropping idle, stalled and slow
connections, reading a body into a buffer under a deadline, refusing a body without resetting
the connection under it, cancelling a request when its client leaves, and the pools' Prometheus
metrics (one process, or several workers in multiprocess mode).

uvicorn holds forever a connection that never sends a request, or sends its head a byte at a
time.  :func:`protocol` gives uvicorn's own HTTP protocol with a *head deadline*: from the moment
the connection opens, and from the end of each answer, a whole request head must arrive within
the idle timeout, however it trickles in, or the connection is closed.  It also tells each
request when its connection is lost (:func:`cancelled_on_disconnect`), even while the request
waits for a buffer and has not read its body, so a client that gives up leaves the queue at
once.  TCP shows a client that closes and one that only shuts down its sending side (a
half-close, still reading) alike: an end of stream.  One that comes within 0.1 s of a whole
request is taken as a half-close, and the request is answered, then the connection closed; one
that comes later, while the request waits, as the client giving up (as nginx and Go's net/http
take every end of stream).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
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

MiB = 1 << 20
#: seconds after a whole request within which an end of stream is taken as a half-close
HALF_S = 0.1


class Lost:
    """A connection's loss, as its requests see it (in their scope, under ``KEY``); or the
    server's shutdown, once its graceful timeout is nearly over (``shutting_down``)."""

    KEY = "aiopinned.lost"

    def __init__(self) -> None:
        self.happened = self.shutting_down = False
        self.callbacks: list[Callable[[], object]] = []

    def happen(self, shutting_down: bool = False) -> None:
        self.happened, self.shutting_down = True, shutting_down
        for callback in list(self.callbacks):
            callback()


def ended(request: Request, counters: Counter[str]) -> Response:
    """The answer to a request cut short by :func:`cancelled_on_disconnect`: 499 where the
    client left (nobody reads it), 503 where the server is shutting down."""
    lost: Lost = request.scope.get(Lost.KEY) or Lost()
    if lost.shutting_down:
        return refuse(counters, 503, "shutting down: try again", **{"Retry-After": "1"})
    counters["client_gone"] += 1
    return Response(status_code=499)


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
            self.lost, self.head_deadline, self.half_closed = Lost(), None, False
            self.whole: tuple[Any, float] = (None, 0.0)  # the last whole request, and when
            super().connection_made(transport)
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._no_head_deadline()
            super().connection_lost(exc)
            self.lost.happen()

        def eof_received(self) -> bool | None:
            cycle, (whole, at) = self.cycle, self.whole
            if whole is cycle and not cycle.response_complete and self.loop.time() - at < HALF_S:
                self.half_closed = True  # a half-close right after a whole request: answer it
                return True  # (keep the write side open; close after the answer)
            super().eof_received()  # (None: the transport closes; an unfinished request can
            return None  # never end)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._in_head():  # a request began: tell it how to hear of a loss
                self._no_head_deadline()
                self.scope.setdefault(Lost.KEY, self.lost)
                if not self.cycle.more_body and self.whole[0] is not self.cycle:
                    self.whole = (self.cycle, self.loop.time())

        def shutdown(self) -> None:
            """Graceful shutdown: a request still running once 80% of its time is over is
            ended with a 503 (uvicorn would cancel it at 100%, logging a traceback)."""
            super().shutdown()
            grace = self.config.timeout_graceful_shutdown
            if not self._in_head() and grace is not None:
                self.loop.call_later(0.8 * grace, self.lost.happen, True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.half_closed:
                self.transport.close()
            elif self._in_head():
                self._await_head()

        def _in_head(self) -> bool:
            return self.cycle is None or bool(self.cycle.response_complete)

        def _await_head(self) -> None:
            """A whole request head must come within the idle timeout from now."""
            self._no_head_deadline()
            if not self.transport.is_closing():
                self.head_deadline = self.loop.call_later(self.timeout_keep_alive, self._too_slow)

        def _too_slow(self) -> None:
            self.head_deadline = None
            if self._in_head() and not self.transport.is_closing():
                self.transport.close()

        def _no_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
                self.head_deadline = None

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


async def metrics(request: Request) -> Response:
    """``GET /metrics``: the pools in ``app.state.pools`` (name -> pool) in Prometheus's text
    format; in its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), every worker's figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(PoolCollector(request.app.state.pools))  # (one family per name)
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


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, where it has one (None: the help says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_http_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?", choices=["serve"], default="serve", help="what to do")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on")
    for name, default, what in (
        ("read", 10.0, "seconds to wait for each part of a body, then 408"),
        ("idle", 5.0, "seconds for a whole request head (and between requests), then close"),
        ("shutdown", 5, "seconds to finish requests on shutdown"),
    ):
        parser.add_argument(f"--{name}-timeout", type=type(default), default=default, help=what)
    parser.add_argument(
        "--body-min-rate",
        type=float,
        default=float(MiB),
        help="bytes/s a body must average after --read-timeout's grace, then 408",
    )
    parser.add_argument(
        "--drain-mib",
        type=float,
        default=64,
        help="MiB of a refused body read and dropped so the client sees the answer",
    )
    parser.add_argument(
        "--http",
        choices=["auto", "h11", "httptools"],
        default="auto",
        help="uvicorn's HTTP/1.1 implementation",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level")
    parser.add_argument("--workers", type=_at_least_one, default=1, help="processes, a pool each")


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """``args`` once the options :func:`add_http_arguments` added are in range."""
    if not args.body_min_rate > 0 or args.drain_mib < 0:
        parser.error("--body-min-rate must be > 0 and --drain-mib >= 0")
    return args


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
    try:
        if args.workers == 1:
            uvicorn.Server(uvicorn.Config(make_app(), **options)).run()
            return
        os.environ[ARGV_ENV] = json.dumps(sys.argv[1:] if argv is None else argv)
        uvicorn.run(factory, factory=True, workers=args.workers, **options)
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: that is done
        pass


def argv_from_env() -> list[str]:
    """A worker's command line (see :func:`serve`)."""
    return list(json.loads(os.environ[ARGV_ENV]))


def refuse(counters: Counter[str], status: int, why: str, **headers: str) -> Response:
    """An error answer sent before the body is read, so the connection closes after it."""
    counters["refused" if status == 503 else "rejected"] += 1
    return Response(why, status, headers={"Connection": "close", **headers})


async def refuse_unread(
    request: Request, counters: Counter[str], status: int, why: str, args: argparse.Namespace
) -> Response:
    """:func:`refuse` a request whose body is unread, once it is drained (``--drain-mib``,
    within ``--read-timeout``); without a ``Content-Length`` (a chunked body), 411, or 400 where
    the body was empty."""
    empty = await drain(request, int(args.drain_mib * MiB), args.read_timeout)
    if "content-length" not in request.headers:
        status, why = (400, "the body is empty") if empty else (411, "Content-Length required")
    return refuse(counters, status, why)


async def drain(request: Request, limit: int, timeout: float) -> bool:
    """Read and drop a body that will not be used, up to ``limit`` bytes within ``timeout``
    seconds; whether it ended, empty.  Closing a connection with unread data resets it, and a
    client still sending may then never see the answer: nginx's lingering close, bounded.  A
    client that waits for ``100 Continue`` has sent nothing, and is not asked for its body."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return False
    got = 0
    with anyio.move_on_after(timeout):
        async for piece in request.stream():
            got += len(piece)
            if got > limit:
                return False
        return got == 0
    return False


async def read_into(
    request: Request, view: memoryview, read_timeout: float, min_rate: float = math.inf
) -> None:
    """Read the body straight into ``view``, which is its ``Content-Length`` long.  Each piece
    must arrive within ``read_timeout`` seconds, and the whole body within ``read_timeout`` plus
    its length at ``min_rate`` bytes/s (as Apache's ``mod_reqtimeout`` ``MinRate``), so a client
    that trickles cannot hold its buffer for long.

    Raises:
        BodyError: 408 for a stalled or too slow body, 400 for one longer or shorter than
            announced.
        starlette.requests.ClientDisconnect: the client left.
    """
    got, pieces = 0, request.stream().__aiter__()
    deadline = anyio.current_time() + read_timeout + len(view) / min_rate
    while True:
        left = deadline - anyio.current_time()
        try:
            with anyio.fail_after(max(0.0, min(read_timeout, left))):
                piece = await pieces.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            if left <= read_timeout:
                why = f"the body came slower than {min_rate:.0f} bytes/s"
                raise BodyError(408, why) from None
            raise BodyError(408, f"no part of the body came for {read_timeout} s") from None
        if got + len(piece) > len(view):
            raise BodyError(400, f"the body is longer than its Content-Length ({len(view)})")
        view[got : got + len(piece)] = piece
        got += len(piece)
    if got != len(view):
        raise BodyError(400, f"the body ended after {got} of {len(view)} bytes")
