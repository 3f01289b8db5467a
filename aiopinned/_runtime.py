"""What an open pool runs on: its backend, the way into its loop, the watcher and the threads.

A pool holds one :class:`Runtime` from ``open()`` on, never ``None``: before that it holds
:data:`NOT_OPEN`, which answers any use with the error a user should see.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import NoReturn, cast

import anyio

from ._block import ALLOCATED, Block
from ._events import EventWatcher
from ._loopport import LoopPort, start_reaper
from ._pinning import Pinning
from ._stats import Counters
from .backends import Backend, device_reader, make_backend

NOT_OPEN_MESSAGE = "the pool is not open: use 'async with PinnedPool() as pool'"


class Runtime:
    __slots__ = ("backend", "pinning", "port", "watcher")

    def __init__(self, backend: Backend, port: LoopPort, counters: Counters) -> None:
        self.backend = backend
        self.port = port
        self.watcher = EventWatcher(backend, port)
        self.pinning = Pinning(backend, port, counters)

    @classmethod
    async def start(
        cls,
        spec: str | Backend,
        pinning: tuple[str, int | None, int | str | None, int | None],
        counters: Counters,
    ) -> Runtime:
        """Bind to the running loop and make the backend (off the loop: CUDA starts here).
        Without a device given, the pool serves the device current on this (the loop's) thread,
        read after the driver has loaded off the loop."""
        port = LoopPort()
        how, threads, numa_node, device = pinning
        if device is None:
            reader = await anyio.to_thread.run_sync(device_reader, spec)
            device = None if reader is None else reader()
        backend = await anyio.to_thread.run_sync(
            make_backend, spec, how, threads, numa_node, device
        )
        start_reaper()  # now, so that finalizers never have to start a thread
        return cls(backend, port, counters)

    def abandon(self, description: str, pool: object, idle: list[Block]) -> None:
        """``pool`` is collected while still open (its finalizer): warn, as asyncio does for an
        unclosed transport, and unpin its idle blocks in the reaper thread (nothing else can
        reach them any more; at interpreter exit they are left to the process's end)."""
        warnings.warn(
            f"unclosed {description}: use 'async with PinnedPool()' or 'await pool.aclose()'",
            ResourceWarning,
            stacklevel=1,
            source=pool,
        )
        for block in idle:
            self.pinning.unpin_after_streams(block)

    def gauges(self) -> dict[str, int]:
        """What the runtime knows now, as :class:`~aiopinned.PoolStats` fields."""
        pages = getattr(self.backend, "huge_pages", None)
        return {"pending_events": len(self.watcher),
                "huge_page_fallbacks": getattr(pages, "fallbacks", 0)}  # fmt: skip

    def register_chunk_bytes(self) -> int:
        """The most one registration covers (a custom backend that says nothing: no bound)."""
        return int(getattr(self.backend, "register_chunk_bytes", None) or 1 << 80)

    def close(self) -> None:
        """Let the watcher's idle threads go, and close the backend."""
        self.watcher.stop()
        self.pinning.close()
        self.backend.close()


def warn_live(pool: object, blocks: Iterable[Block]) -> None:
    """A pool closes: say how many buffers are still out (each is unpinned once freed)."""
    live = [b for b in blocks if b.state == ALLOCATED]
    if live:
        warnings.warn(
            f"{len(live)} PinnedBuffer(s) of {sum(b.size for b in live)} bytes were still out "
            f"when {pool!r} closed: free() them before aclose(); each is unpinned once freed",
            ResourceWarning,
            stacklevel=4,
            source=pool,
        )


def warn_late_free(block: Block) -> None:
    """A buffer is freed after its pool closed (its block is unpinned now)."""
    warnings.warn(
        f"a PinnedBuffer of {block.size} bytes was freed after its pool closed: its block is "
        "unpinned now; free buffers before aclose()",
        ResourceWarning,
        stacklevel=4,
    )


class _NotOpen:
    """Stands in for the runtime of a pool that is not open: every use raises."""

    __slots__ = ()

    def gauges(self) -> dict[str, int]:
        return {"pending_events": 0, "huge_page_fallbacks": 0}

    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(NOT_OPEN_MESSAGE)


NOT_OPEN = cast(Runtime, _NotOpen())
