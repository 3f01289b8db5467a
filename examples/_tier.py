"""A pinned tier brought up while the server serves (``--tier-gib``), and ``/health``.

A host tier (offloaded KV cache, say) is tens of GB of pinned pages.  Pinning it takes seconds to
minutes, so the server does not wait for it: it starts answering at once, the tier's pool pins in
the background (``PinnedPool.start_reserve``, one segment at a time, ``--pin-threads`` threads
touching pages), and ``GET /health`` answers ``503`` with the progress until the tier is up, then
``200``: a load balancer sends traffic that needs the tier only once it is there.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse

from aiopinned import PinnedPool, Reserving

GiB = 1 << 30


@dataclass
class Tier:
    pool: PinnedPool
    job: Reserving | None = None
    #: ``time.monotonic()`` when the bring-up started and ended (``None``: not yet)
    started: float | None = None
    ended: float | None = None
    error: str | None = None

    def state(self) -> dict[str, Any]:
        job = self.job
        up = job is not None and job.done() and job.done_bytes == job.total_bytes
        return {"bytes": 0 if job is None else job.total_bytes,
                "pinned_bytes": 0 if job is None else job.done_bytes, "up": up,
                "started": self.started, "ended": self.ended, "error": self.error}  # fmt: skip


def _at_least(low: float, kind: type = float) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, not {text}")
        return value

    return parse


def add_tier_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tier-gib",
        type=_at_least(0),
        default=0,
        help="pinned tier to bring up while serving (0: none)",
    )
    parser.add_argument(
        "--tier-page-kib", type=_at_least(4, int), default=2048, help="the tier's page size"
    )
    parser.add_argument(
        "--tier-after-s",
        type=_at_least(0),
        default=0,
        help="seconds after startup to begin the bring-up",
    )
    parser.add_argument("--pin-threads", type=_at_least(1, int), help="threads touching the "
                        "tier's pages (default: one per core, up to 16)")  # fmt: skip


@contextlib.asynccontextmanager
async def bring_up(args: argparse.Namespace, backend: str) -> AsyncIterator[Tier | None]:
    """The tier's pool, its bring-up started ``--tier-after-s`` seconds from now (in the
    background); closed, and unpinned, on leaving."""
    if not args.tier_gib:
        yield None
        return
    nbytes = int(args.tier_gib * GiB)
    async with (
        PinnedPool(backend, max_bytes=nbytes, pin_threads=args.pin_threads) as pool,
        anyio.create_task_group() as tg,
    ):
        tier = Tier(pool)

        async def start() -> None:
            await anyio.sleep(args.tier_after_s)
            tier.started = time.monotonic()
            tier.job = pool.start_reserve(nbytes, block_bytes=args.tier_page_kib << 10)
            try:
                await tier.job
            except Exception as exc:  # (what was pinned serves; /health says why not all)
                tier.error = f"{type(exc).__name__}: {exc}"
            finally:
                tier.ended = time.monotonic()

        tg.start_soon(start)
        try:
            yield tier
        finally:
            tg.cancel_scope.cancel()


async def health(request: Request) -> JSONResponse:
    """200 once the server can serve everything (its tier, if any, is up); else 503."""
    tier: Tier | None = request.app.state.server.tier
    state = None if tier is None else tier.state()
    up = state is None or state["up"]
    return JSONResponse({"tier": state}, status_code=200 if up else 503)
