"""PinnedPool: the seed's caching host allocator, moved into the event loop.

How the seed's three lock domains map onto the loop
---------------------------------------------------
The seed guards its blocks registry, free list and event queue with three mutexes.  Here all
three are owned by the pool's event-loop thread and are only changed from it (other threads post
to the loop), and no critical section over them contains an ``await``: a section that runs
without yielding cannot be interleaved on a cooperative loop, so it needs no lock at all.  The
exception is the registry, which foreign threads *read* (``record_stream`` with a raw pointer,
releases after the pool closed): it has a :class:`threading.Lock`, held for dict operations only.

The one operation that does span an ``await`` is changing how much memory is pinned (grow, or
release idle blocks to make room, or ``empty_cache``).  Instead of holding an async lock across a
pin that can take seconds (which would serialize every grower behind it and make cancelling the
holder delicate), it is split into three steps: *plan* on the loop (reserve the bytes against
``max_bytes``, take the victims out of the free list and the registry), *execute* in a thread
(unpin the victims, then pin), *commit* on the loop (register the block).  The plan's effects are
visible to everyone at once, so no other task can see a half-done change; if the caller goes
away, the thread's outcome is adopted by the pool (``_adopt``) instead of being lost.

Waiting (``max_bytes``)
-----------------------
``allocate`` reuses a cached block, else grows if the cap allows (releasing idle blocks that are
too small, largest first), else queues.  The queue is strictly FIFO: a returning block, or room to
grow, goes to the *first* waiter only, and nobody (``allocate_nowait`` included) overtakes a
queued waiter.  A big request at the head therefore holds back smaller ones behind it; in exchange
nobody starves, since every block that comes back is either used by the head or left idle, and
idle blocks are what the head releases to grow.  Invariant: whenever ``_waiters`` is non-empty,
no idle block fits the head and the head cannot grow, even by releasing every idle block.

A grant is handed to a specific waiter before it is woken (trio's ``ParkingLot`` model): the
waiter owns either a block or a growth plan.  A waiter that is cancelled after the grant passes
the block on (to the next waiter, else the free list) or undoes the plan; a timeout that races a
grant returns the grant (bpo-37658).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial
from threading import get_ident
from types import TracebackType
from typing import Any

import anyio
from sortedcontainers import SortedList

from ._block import ALLOCATED, FREE, PENDING, RELEASED, Block
from ._buffer import PinnedBuffer
from ._events import EventWatcher
from ._freelist import FreeList
from ._loopport import LoopPort, run_off_loop
from ._stats import PoolStats
from .backends import Backend, make_backend
from .errors import InvalidBufferError, PinnedMemoryError, PoolClosed, WouldBlock

__all__ = ["PinnedPool"]

log = logging.getLogger("aiopinned")

_NEW, _OPEN, _CLOSING, _CLOSED = range(4)
_BACKEND_NAMES = ("auto", "cuda", "host")
_NO_CAP = 1 << 80  # larger than any request; keeps the hot path's cap check a plain int compare


def _pow2(n: int) -> int:
    """The seed's ``PowerOf2Ceil``."""
    return 1 << (n - 1).bit_length()


def _as_size(nbytes: object, what: str = "nbytes") -> int:
    if isinstance(nbytes, (bool, float)):
        raise TypeError(f"{what} must be an int, not {type(nbytes).__name__}")
    try:
        n = operator.index(nbytes)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(nbytes).__name__}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, not {n}")
    return n


def _as_timeout(timeout: object) -> float:
    """Seconds as a float (``inf`` for ``None``)."""
    if timeout is None:
        return math.inf
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be >= 0, not {timeout}")
    return float(timeout)


def _pointer_of(obj: object) -> int:
    if isinstance(obj, int) and not isinstance(obj, bool):
        ptr = obj
    elif hasattr(obj, "data_ptr"):
        ptr = obj.data_ptr()
    elif hasattr(obj, "__array_interface__"):
        ptr = obj.__array_interface__["data"][0]
    else:
        raise TypeError(
            "record_stream() takes a PinnedBuffer, an int address, or an object with data_ptr() "
            f"or __array_interface__, not {type(obj).__name__}"
        )
    if ptr is None or ptr < 0:
        raise ValueError(f"not a valid address: {ptr!r}")
    return int(ptr)


class _Plan:
    """Growth granted to one caller: unpin ``victims``, then pin ``size`` bytes.

    ``charge`` is what the plan added to ``_reserved`` when it was made: ``size - freed`` where
    positive.  Victims stay counted until they are really unpinned, so ``_reserved`` bounds what is
    pinned at every instant, not only once the thread is done (another grower cannot pin into
    room that a victim still occupies).
    """

    __slots__ = ("charge", "freed", "size", "victims")

    def __init__(self, size: int, victims: list[Block]) -> None:
        self.size = size
        self.victims = victims
        self.freed = sum(b.size for b in victims)
        self.charge = max(size - self.freed, 0)


class _Waiter:
    __slots__ = ("event", "grant", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.event = anyio.Event()
        #: what the waiter was handed: a Block, a _Plan, or an exception to raise
        self.grant: Block | _Plan | BaseException | None = None


def _ignore(result: object, error: BaseException | None) -> None:
    if error is not None:
        log.error("aiopinned: a release finished after its caller left", exc_info=error)


class PinnedPool:
    """A caching allocator of pinned host memory, for one event loop.

    Use it as ``async with PinnedPool() as pool:``.  Entering picks and starts the backend (off
    the loop) and binds the pool to the running loop and thread; leaving stops it and releases
    every idle block.  ``free`` may be called from any thread; everything else belongs to the
    pool's loop.

    Args:
        backend: ``"auto"`` (``cuda`` when a CUDA device is usable, else ``host``), ``"cuda"``,
            ``"host"``, or an object implementing :class:`aiopinned.backends.Backend`.
        max_bytes: cap on pinned bytes; ``None`` for no cap.  Under the cap, ``allocate`` waits
            for a block to come back instead of pinning more.
        spin_s: opt-in.  While callers wait and copies are in flight, the loop also polls the
            oldest event of each stream once per iteration, for up to this many seconds each
            time waiting starts: a waiter then resumes within a loop iteration of its copy
            ending, instead of after a cross-thread wake-up (100-250 µs on the H200 host).  It
            keeps the loop thread busy meanwhile and, through the GIL, slows other Python
            threads; ``0`` (the default) leaves it to the watcher threads alone.
    """

    def __init__(
        self,
        backend: str | Backend = "auto",
        *,
        max_bytes: int | None = None,
        spin_s: float = 0.0,
    ) -> None:
        if isinstance(backend, str):
            if backend not in _BACKEND_NAMES:
                raise ValueError(f"backend must be one of {_BACKEND_NAMES}, not {backend!r}")
        elif not isinstance(backend, Backend):
            raise TypeError(f"backend must be a name or a Backend, not {type(backend).__name__}")
        if max_bytes is not None:
            max_bytes = _as_size(max_bytes, "max_bytes")
            if max_bytes == 0:
                raise ValueError("max_bytes must be > 0 (or None for no cap)")
        if isinstance(spin_s, bool) or not isinstance(spin_s, (int, float)):
            raise TypeError(f"spin_s must be a number of seconds, not {type(spin_s).__name__}")
        if not spin_s >= 0:
            raise ValueError(f"spin_s must be >= 0, not {spin_s}")
        self._spin_s = float(spin_s)
        self._spin_until = -1.0  # < 0: not spinning
        self._spec = backend
        self._max_bytes = max_bytes
        self._cap = _NO_CAP if max_bytes is None else max_bytes
        self._state = _NEW
        self._backend: Backend | None = None
        self._port: LoopPort | None = None
        self._watcher: EventWatcher | None = None
        self._thread_id = -1
        # Registry of every pinned block (read from other threads under _mutex).
        self._blocks: dict[int, Block] = {}
        self._starts = SortedList()
        self._mutex = threading.Lock()
        self._free = FreeList(bounded=max_bytes is not None)
        # bool(_waiters) implies: no idle block fits _waiters[0] and it cannot grow.
        self._waiters: deque[_Waiter] = deque()
        # Counters.  _reserved bounds what is pinned now or may be by operations in flight:
        # registered blocks, blocks being pinned, and blocks being unpinned.
        self._reserved = 0
        self._peak_reserved = 0
        self._active_bytes = 0
        self._active_requests = 0
        self._returned = 0
        self._cache_hits = 0
        self._cache_misses = 0
        self._num_alloc = 0
        self._num_free = 0
        self._alloc_us = 0.0
        self._alloc_us_max = 0.0
        self._free_us = 0.0
        self._free_us_max = 0.0
        self._num_waits = 0
        self._wait_us = 0.0
        self._wait_us_max = 0.0

    # -- lifecycle ----------------------------------------------------------------------------
    async def open(self) -> PinnedPool:
        """Start the pool on the running loop (``async with`` does this)."""
        if self._state != _NEW:
            raise RuntimeError("this PinnedPool was already opened; a pool opens once")
        port = LoopPort()
        self._state = _OPEN
        try:
            backend = await anyio.to_thread.run_sync(make_backend, self._spec)
        except BaseException:
            self._state = _CLOSED
            raise
        self._port, self._thread_id, self._backend = port, port.thread_id, backend
        self._watcher = EventWatcher(backend, port)
        return self

    async def aclose(self) -> None:
        """Close the pool: wake waiters with :class:`PoolClosed`, release idle memory.

        Blocks whose copies are still running are waited for (off the loop) and released.
        Buffers still out are released to the system when they are freed.
        """
        if self._state != _OPEN or self._backend is None:
            self._state = _CLOSED if self._state == _NEW else self._state
            return
        self._check_loop()
        self._state = _CLOSING
        waiters, self._waiters = self._waiters, deque()
        for w in waiters:
            w.grant = PoolClosed("the pool was closed while this call waited for a block")
            w.event.set()
        watcher, backend = self._require_watcher(), self._backend
        while len(watcher):
            await run_off_loop(self._port_(), _synchronize_all, backend, watcher.pending_events(),
                               on_orphan=_ignore)
            watcher.poll()
        victims = self._take_idle()
        self._state = _CLOSED
        await self._release_idle(victims)
        watcher.stop()
        backend.close()

    async def __aenter__(self) -> PinnedPool:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- allocation ---------------------------------------------------------------------------
    async def allocate(self, nbytes: int, *, timeout: float | None = None) -> PinnedBuffer:
        """A buffer of at least ``nbytes`` pinned bytes.

        Reuses the smallest idle block that fits; else pins a new block (rounded up to a power
        of two, or to ``nbytes`` where that does not fit under ``max_bytes``), releasing idle
        blocks that are too small if the cap is in the way; else waits, first come first served,
        for a block to come back.

        Raises:
            TypeError / ValueError: ``nbytes`` is not an int, is negative, or exceeds max_bytes.
            TimeoutError: no block within ``timeout`` seconds (nothing is left queued or held).
            PoolClosed: the pool is closed, or closed while waiting.
            PinnedMemoryError: the system refused to pin more memory.
            RuntimeError: called from a thread or loop the pool does not belong to.
        """
        # The cache hit, checked in one expression: only the checks that can fail on it.
        if (
            type(nbytes) is int
            and 0 < nbytes <= self._cap
            and timeout is None
            and not self._waiters
            and get_ident() == self._thread_id
            and self._state == _OPEN
        ):
            block = self._free.take(nbytes)
            if block is not None:
                self._cache_hits += 1
                return self._hand_out(block, nbytes)
        return await self._allocate_checked(nbytes, timeout)

    async def _allocate_checked(self, nbytes: object, timeout: object) -> PinnedBuffer:
        size = self._check_request(nbytes)
        deadline = _as_timeout(timeout)
        if size == 0:
            return PinnedBuffer(self, None, 0)
        if not self._waiters:
            block = self._free.take(size)
            if block is not None:
                self._cache_hits += 1
                return self._hand_out(block, size)
        if deadline != math.inf:
            deadline += anyio.current_time()
        return await self._allocate_slow(size, deadline)

    def allocate_nowait(self, nbytes: int) -> PinnedBuffer:
        """A cached block at once, or :class:`WouldBlock`.

        Raises ``WouldBlock`` wherever ``allocate`` would wait (callers are queued, or no block
        fits), and also where it would have to pin new memory: pinning blocks the calling
        thread for up to seconds, which a non-blocking call must not do.
        """
        if (
            type(nbytes) is int
            and 0 < nbytes <= self._cap
            and get_ident() == self._thread_id
            and self._state == _OPEN
        ):
            size = nbytes
        else:
            size = self._check_request(nbytes)
            if size == 0:
                return PinnedBuffer(self, None, 0)
        if self._waiters:
            raise WouldBlock(f"{len(self._waiters)} callers are queued ahead; nobody overtakes them")
        block = self._free.take(size)
        if block is None:
            raise WouldBlock(f"no idle block of at least {size} bytes; await allocate() instead")
        self._cache_hits += 1
        return self._hand_out(block, size)

    def allocate_blocking(self, nbytes: int, *, timeout: float | None = None) -> PinnedBuffer:
        """``allocate`` for plain threads (e.g. sync data-loader workers): blocks the caller."""
        if get_ident() == self._thread_id:
            raise RuntimeError(
                "allocate_blocking() on the pool's own loop thread would deadlock; "
                "use 'await pool.allocate()'"
            )
        if self._state == _NEW:
            raise RuntimeError("the pool is not open: use 'async with PinnedPool() as pool'")
        return anyio.from_thread.run(
            partial(self.allocate, nbytes, timeout=timeout), token=self._port_().token
        )

    @contextlib.asynccontextmanager
    async def buffer(self, nbytes: int, *, timeout: float | None = None) -> AsyncIterator[PinnedBuffer]:
        """``async with pool.buffer(n) as buf:`` allocates, and frees on exit."""
        buf = await self.allocate(nbytes, timeout=timeout)
        try:
            yield buf
        finally:
            if not buf.freed:
                self.free(buf)

    # -- freeing ------------------------------------------------------------------------------
    def free(self, buf: PinnedBuffer) -> None:
        """Give a buffer back.  Synchronous, never blocks, safe from any thread.

        With no stream recorded, the block is idle again at once; with streams, one event is
        recorded per stream and the block comes back when all of them have completed.  While a
        view of the buffer is still referenced, the return waits for the last view to go.

        Raises:
            InvalidBufferError: freed twice, or not from this pool.
        """
        if not isinstance(buf, PinnedBuffer):
            raise TypeError(f"free() takes a PinnedBuffer, not {type(buf).__name__}")
        if buf._pool is not self:
            raise InvalidBufferError("this buffer belongs to another pool")
        if buf._block is None:
            return
        try:
            buf._live.pop()
        except IndexError:
            raise InvalidBufferError("this buffer was already freed") from None
        if get_ident() == self._thread_id:
            self._release(buf)
        else:
            self._post(self._release, buf)

    def _free_from_finalizer(self, buf: PinnedBuffer) -> None:
        """``PinnedBuffer.__del__``: never touch pool state from inside a finalizer."""
        try:
            buf._live.pop()
        except IndexError:
            return
        self._post(self._release, buf)

    def _views_gone(self, buf: PinnedBuffer) -> None:
        """The anchor of ``buf``'s views died (any thread, from a finalizer)."""
        self._post(self._after_views, buf)

    def _after_views(self, buf: PinnedBuffer) -> None:
        if not buf._live and not buf._retired and not buf._views_alive():
            self._retire(buf)

    def _release(self, buf: PinnedBuffer) -> None:
        if not buf._views_alive():  # else _after_views retires it when the last view goes
            self._retire(buf)

    def _retire(self, buf: PinnedBuffer) -> None:
        """Freed, and no view left: the block goes back (now, or after its streams' events)."""
        block = buf._block
        assert block is not None and not buf._retired
        buf._retired = True
        self._active_bytes -= block.size
        self._active_requests -= 1
        streams = block.streams
        if not streams or self._state == _CLOSED:
            self._return_block(block)
            return
        backend, watcher = self._require_backend(), self._require_watcher()
        block.state = PENDING
        block.event_count = len(streams)
        done = partial(self._event_done, block)
        for key in list(streams):
            watcher.add(key, backend.record(key), done)
        streams.clear()
        if self._waiters:
            self._spin()

    def _event_done(self, block: Block) -> None:
        block.event_count -= 1
        if block.event_count == 0:
            self._return_block(block)

    def _return_block(self, block: Block) -> None:
        """An idle block: to the free list (and on to the first waiter), or to the system."""
        if self._state == _CLOSED:
            self._release_detached(block)
            return
        block.state = FREE
        self._free.add(block)
        self._returned += 1
        if self._waiters:
            self._serve_waiters()

    # -- streams and events -------------------------------------------------------------------
    def record_stream(self, obj: object, stream: object) -> bool:
        """Mark memory as used by work queued on ``stream`` (the seed's ``record_event``).

        ``obj`` is a :class:`PinnedBuffer`, an int address, or anything with ``data_ptr()`` or
        ``__array_interface__``; an address anywhere inside a live block counts.  Returns
        ``False`` for memory that is not a live allocation of this pool.
        """
        key = self._require_backend().normalize_stream(stream)
        if isinstance(obj, PinnedBuffer):
            if obj._pool is not self:
                return False
            if not obj._live:
                raise InvalidBufferError("this buffer was freed; record streams before free()")
            block = obj._block
        else:
            block = self._find_live(_pointer_of(obj))
        if block is None:
            return False
        block.streams.add(key)
        return True

    def process_events(self) -> int:
        """Return every block whose events have completed; how many came back."""
        if self._watcher is None:
            return 0
        before = self._returned
        self._watcher.poll()
        return self._returned - before

    async def synchronize(self, stream: object = None) -> None:
        """Wait, without blocking the loop, for all work queued on ``stream`` so far."""
        backend = self._require_backend()
        key = backend.normalize_stream(stream)
        self._check_loop()
        done = anyio.Event()
        self._require_watcher().add(key, backend.record(key), done.set)
        await done.wait()

    # -- the cache ----------------------------------------------------------------------------
    async def empty_cache(self) -> int:
        """Release every idle block to the system (off the loop); returns the bytes released."""
        if self._state != _OPEN:
            return 0
        self._check_loop()
        self.process_events()
        victims = self._take_idle()
        await self._release_idle(victims)
        return sum(b.size for b in victims)

    def copy_data(self, dest: int, src: int, count: int) -> None:
        """Copy ``count`` bytes from address ``src`` to ``dest`` (the seed's ``copy_data``)."""
        for name, value in (("dest", dest), ("src", src), ("count", count)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        if count and not (dest and src):
            raise ValueError("copy_data() with a null address")
        self._require_backend().copy(dest, src, count)

    # -- what it is ---------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend's name (``"cuda"``/``"host"``); before opening, what was asked for."""
        if self._backend is not None:
            return self._backend.name
        return self._spec if isinstance(self._spec, str) else self._spec.name

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def closed(self) -> bool:
        return self._state >= _CLOSING

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's counters."""
        return PoolStats(
            backend=self.backend,
            max_bytes=self._max_bytes,
            reserved_bytes=self._reserved,
            active_bytes=self._active_bytes,
            active_requests=self._active_requests,
            free_blocks=len(self._free),
            free_bytes=self._free.nbytes,
            pending_events=0 if self._watcher is None else len(self._watcher),
            waiters=len(self._waiters),
            num_host_alloc=self._num_alloc,
            num_host_free=self._num_free,
            cache_hits=self._cache_hits,
            cache_misses=self._cache_misses,
            peak_reserved_bytes=self._peak_reserved,
            host_alloc_time_us_total=self._alloc_us,
            host_alloc_time_us_max=self._alloc_us_max,
            host_free_time_us_total=self._free_us,
            host_free_time_us_max=self._free_us_max,
            num_waits=self._num_waits,
            wait_time_us_total=self._wait_us,
            wait_time_us_max=self._wait_us_max,
        )

    def __repr__(self) -> str:
        state = ("new", "open", "closing", "closed")[self._state]
        cap = "" if self._max_bytes is None else f"/{self._max_bytes}"
        return (
            f"<PinnedPool {self.backend} {state} reserved={self._reserved}{cap} "
            f"active={self._active_requests} free_blocks={len(self._free)} "
            f"pending_events={0 if self._watcher is None else len(self._watcher)} "
            f"waiters={len(self._waiters)}>"
        )

    # -- internals: checks --------------------------------------------------------------------
    def _check_request(self, nbytes: object) -> int:
        size = nbytes if type(nbytes) is int and nbytes >= 0 else _as_size(nbytes)
        if self._state != _OPEN:
            if self._state == _NEW:
                raise RuntimeError("the pool is not open: use 'async with PinnedPool() as pool'")
            raise PoolClosed("the pool is closed")
        self._check_loop()
        if self._max_bytes is not None and size > self._max_bytes:
            raise ValueError(f"{size} bytes is more than the pool's max_bytes ({self._max_bytes})")
        return size

    def _check_loop(self) -> None:
        port = self._port
        if get_ident() != self._thread_id or port is None or not port.is_current():
            raise RuntimeError(
                "this PinnedPool belongs to another event loop (the one it was opened on); "
                "only free() may be called from other threads, and allocate_blocking() from "
                "plain threads"
            )

    def _require_backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("the pool is not open: use 'async with PinnedPool() as pool'")
        return self._backend

    def _require_watcher(self) -> EventWatcher:
        if self._watcher is None:
            raise RuntimeError("the pool is not open: use 'async with PinnedPool() as pool'")
        return self._watcher

    def _port_(self) -> LoopPort:
        if self._port is None:
            raise RuntimeError("the pool is not open: use 'async with PinnedPool() as pool'")
        return self._port

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn`` on the pool's loop; if the loop is gone, release what it would have."""
        if self._port is not None and self._port.post(fn, *args):
            return
        buf = args[0] if args and isinstance(args[0], PinnedBuffer) else None
        if buf is not None and buf._block is not None and not buf._retired:
            buf._retired = True
            self._release_detached(buf._block)

    # -- internals: handing out, growing, waiting ---------------------------------------------
    def _hand_out(self, block: Block, nbytes: int) -> PinnedBuffer:
        block.state = ALLOCATED
        self._active_bytes += block.size
        self._active_requests += 1
        return PinnedBuffer(self, block, nbytes)

    async def _allocate_slow(self, size: int, deadline: float) -> PinnedBuffer:
        grant: Block | _Plan | None = None
        if not self._waiters:
            grant = self._plan_growth(size)
        if grant is None:
            grant = await self._wait(size, deadline)
        if isinstance(grant, Block):
            self._cache_hits += 1
            return self._hand_out(grant, size)
        return await self._grow(grant, size, deadline)

    async def _wait(self, size: int, deadline: float) -> Block | _Plan:
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        self._num_waits += 1
        self._spin()
        start = time.perf_counter()
        try:
            with anyio.CancelScope(deadline=deadline):
                await waiter.event.wait()
        except BaseException:
            self._abandon(waiter)
            raise
        finally:
            us = (time.perf_counter() - start) * 1e6
            self._wait_us += us
            self._wait_us_max = max(self._wait_us_max, us)
        grant = waiter.grant
        if grant is None:  # the deadline passed and nothing was handed over
            self._abandon(waiter)
            raise TimeoutError(f"no block of {size} bytes became available in time")
        if isinstance(grant, BaseException):
            raise PoolClosed(str(grant))
        return grant

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter leaves (cancelled or timed out): pass on whatever it was handed."""
        grant = waiter.grant
        if grant is None:
            was_head = bool(self._waiters) and self._waiters[0] is waiter
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            if was_head and self._waiters:
                self._serve_waiters()
        elif isinstance(grant, Block):
            self._return_block(grant)
        elif isinstance(grant, _Plan):
            self._undo_plan(grant)

    def _serve_waiters(self) -> None:
        """Hand idle blocks, or room to grow, to waiters in FIFO order while the head fits."""
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            grant: Block | _Plan | None = self._free.take(waiter.size)
            if grant is None and self._state == _OPEN:
                grant = self._plan_growth(waiter.size)
            if grant is None:
                return
            waiters.popleft()
            waiter.grant = grant
            waiter.event.set()

    def _spin(self) -> None:
        """With ``spin_s``: poll events on the loop while callers wait on copies in flight."""
        if self._spin_s and self._spin_until < 0 and self._watcher and len(self._watcher):
            self._spin_until = time.monotonic() + self._spin_s
            self._port_().call_soon(self._spin_step)

    def _spin_step(self) -> None:
        watcher = self._watcher
        if (
            self._state != _OPEN
            or not self._waiters
            or watcher is None
            or not len(watcher)
            or time.monotonic() > self._spin_until
        ):
            self._spin_until = -1.0
            return
        watcher.poll()
        self._port_().call_soon(self._spin_step)

    def _plan_growth(self, size: int) -> _Plan | None:
        """Reserve room to pin a block for ``size`` bytes, or ``None`` if the cap forbids it.

        Rounds up to a power of two (the seed) unless that would not fit under the cap, then
        takes exactly ``size``; releases idle blocks (largest first) where they stand in the way.
        """
        want = _pow2(size)
        victims: list[Block] = []
        if self._max_bytes is not None:
            room = self._max_bytes - self._reserved
            if size > room:
                if room + self._free.nbytes < size:
                    return None
                for block in self._free.largest_first():
                    victims.append(block)
                    room += block.size
                    if room >= size:
                        break
                for block in victims:
                    self._free.remove(block)
                    self._unregister(block)
            if want > room:
                want = size
        plan = _Plan(want, victims)
        self._reserved += plan.charge
        self._peak_reserved = max(self._peak_reserved, self._reserved)
        return plan

    def _settle(self, plan: _Plan, pinned: bool) -> None:
        """The plan's thread ran: its victims are unpinned, and its block pinned or not."""
        self._reserved += (plan.size if pinned else 0) - plan.freed - plan.charge

    def _undo_plan(self, plan: _Plan) -> None:
        """The plan never ran (its waiter left): the victims are idle blocks again."""
        self._reserved -= plan.charge
        for block in plan.victims:
            self._free.add(self._register(block))
        self._serve_waiters()

    async def _grow(self, plan: _Plan, nbytes: int, deadline: float) -> PinnedBuffer:
        self._cache_misses += 1
        retried = False
        while True:
            try:
                with anyio.CancelScope(deadline=deadline) as scope:
                    ptr = await run_off_loop(
                        self._port_(), self._execute, plan, on_orphan=partial(self._adopt, plan)
                    )
            except PinnedMemoryError:
                self._settle(plan, pinned=False)
                if retried or not self._free:
                    self._serve_waiters()
                    raise
                # As CuPy does: unpin every idle block and try once more.
                retried = True
                plan = _Plan(plan.size, self._take_idle())
                self._reserved += plan.charge
                continue
            except Exception:  # the backend failed otherwise (a cancelled caller is adopted)
                self._settle(plan, pinned=False)
                self._serve_waiters()
                raise
            if scope.cancelled_caught:  # the block is adopted by the pool once it is pinned
                raise TimeoutError(f"pinning {plan.size} bytes did not finish in time")
            break
        self._settle(plan, pinned=True)
        return self._hand_out(self._register(Block(ptr, plan.size)), nbytes)

    def _adopt(self, plan: _Plan, ptr: int | None, error: BaseException | None) -> None:
        """Growth whose caller left: keep the block (or give back the reservation)."""
        pinned = error is None and ptr is not None
        self._settle(plan, pinned)
        if pinned:
            self._return_block(self._register(Block(ptr, plan.size)))  # type: ignore[arg-type]
        else:
            self._serve_waiters()

    # -- internals: the registry and the backend ----------------------------------------------
    def _register(self, block: Block) -> Block:
        with self._mutex:
            self._blocks[block.ptr] = block
            self._starts.add(block.ptr)
        block.state = FREE
        return block

    def _unregister(self, block: Block) -> None:
        with self._mutex:
            del self._blocks[block.ptr]
            self._starts.remove(block.ptr)
        block.state = RELEASED

    def _find_live(self, ptr: int) -> Block | None:
        with self._mutex:
            i = self._starts.bisect_right(ptr) - 1
            if i < 0:
                return None
            block = self._blocks[self._starts[i]]
        if ptr < block.ptr + block.size and block.state == ALLOCATED:
            return block
        return None

    def _take_idle(self) -> list[Block]:
        """Every idle block, out of the free list and the registry (still counted as reserved)."""
        victims = self._free.take_all()
        for block in victims:
            self._unregister(block)
        return victims

    async def _release_idle(self, victims: list[Block]) -> None:
        """Unpin blocks from ``_take_idle`` off the loop; the bytes stay reserved until done."""
        if not victims:
            return
        nbytes = sum(b.size for b in victims)

        def released(_: object, error: BaseException | None) -> None:
            self._reserved -= nbytes
            self._serve_waiters()
            _ignore(None, error)

        try:
            await run_off_loop(self._port_(), self._release_blocks, victims, on_orphan=released)
        except Exception:  # a cancelled caller is settled by `released`, when the thread ends
            released(None, None)
            raise
        released(None, None)

    def _execute(self, plan: _Plan) -> int:
        """Worker thread: unpin the victims, then pin the new block."""
        self._release_blocks(plan.victims)
        backend = self._require_backend()
        t0 = time.perf_counter()
        ptr = backend.alloc(plan.size)
        us = (time.perf_counter() - t0) * 1e6
        with self._mutex:
            self._num_alloc += 1
            self._alloc_us += us
            self._alloc_us_max = max(self._alloc_us_max, us)
        return ptr

    def _release_blocks(self, blocks: list[Block]) -> None:
        """Worker thread: unpin blocks already taken out of the registry."""
        backend = self._require_backend()
        for block in blocks:
            t0 = time.perf_counter()
            backend.free(block.ptr, block.size)
            us = (time.perf_counter() - t0) * 1e6
            with self._mutex:
                self._num_free += 1
                self._free_us += us
                self._free_us_max = max(self._free_us_max, us)

    def _release_detached(self, block: Block) -> None:
        """After close: wait for the block's streams, then unpin it, in a thread of its own."""
        backend = self._require_backend()
        events = [backend.record(key) for key in block.streams]
        block.streams.clear()
        if block.state != RELEASED:
            self._unregister(block)
        with self._mutex:
            self._reserved -= block.size

        def release() -> None:
            _synchronize_all(backend, events)
            for event in events:
                backend.release_event(event)
            self._release_blocks([block])

        threading.Thread(target=release, name="aiopinned-release", daemon=True).start()


def _synchronize_all(backend: Backend, events: list[Any]) -> None:
    for event in events:
        backend.synchronize(event)
