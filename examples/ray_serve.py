"""The inference server as a Ray Serve deployment: one pool per replica.

    pip install ".[examples]" "ray[serve]"
    python examples/ray_serve.py --replicas 2 --max-mib 16   # POST rows to http://127.0.0.1:8000/

Each replica is a process with its own event loop.  Its pools are opened on that loop (on the
first request: a deployment's constructor is not async) and closed with the replica (Ray Serve
awaits ``async def __del__`` when it stops one).  The request path is the example server's,
``inference_server.handle_infer``: a pool buffer as the admission ticket, the body read straight
into it, the model on the device.  Across machines Ray places the replicas on the cluster's
nodes; each opens its own pools on its own host, so ``--max-mib`` is per replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from inference_server import Server, handle_infer, open_server, parse_args
from ray import serve
from starlette.requests import Request
from starlette.responses import Response


class Replica:
    """One replica: the example server's pools, device and model, opened on first use."""

    def __init__(self, argv: list[str]) -> None:
        self.args = parse_args(argv)
        self._stack = contextlib.AsyncExitStack()
        self._opening: asyncio.Future[Server] | None = None

    async def _open(self) -> Server:
        return await self._stack.enter_async_context(open_server(self.args))

    async def __call__(self, request: Request) -> Response:
        if self._opening is None:  # (the first requests share one opening)
            self._opening = asyncio.ensure_future(self._open())
        server = await asyncio.shield(self._opening)
        return await handle_infer(server, request, self.args)

    async def __del__(self) -> None:
        await self._stack.aclose()  # the pools close: in-flight copies end first


Inference = serve.deployment(name="Inference")(Replica)  # (the deployment: replicas of it)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    args, server_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    parse_args(server_argv)  # bad server options fail here, before Ray starts
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(Inference.options(num_replicas=args.replicas).bind(server_argv), route_prefix="/")
    print(f"serving on http://127.0.0.1:{args.port}/ with {args.replicas} replicas; Ctrl-C stops")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(asyncio.Event().wait())
    serve.shutdown()


if __name__ == "__main__":
    main()
