"""PinnedPool: the seed's caching host allocator, moved into the event loop; it orchestrates the
fast path, grow-else-wait and serving waiters (``docs/design.md`` has the objects that hold the
state).  Blocks are *returned* to the free list, or *unpinned*.  Invariant: ``bool(self._lot)``
implies no idle block fits the head and it cannot grow, even by unpinning every idle block.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable
from functools import partial
from threading import get_ident

import anyio

from . import _checks as check
from ._block import ALLOCATED, NO_STREAMS, PENDING, Block, add_stream
from ._bringup import Reserves, Reserving
from ._buffer import PinnedBuffer
from ._cache import Cache
from ._freelist import FreeList
from ._graphs import GraphHolds
from ._growth import SEGMENT_BYTES, Growth
from ._loopport import LoopGone
from ._reservations import Plan
from ._runtime import NOT_OPEN, NOT_OPEN_MESSAGE, Runtime, warn_late_free, warn_live
from ._stats import Counters, PoolStats, taken_on_loop
from ._trim import Trim
from ._waiters import ParkingLot
from .backends import Backend
from .errors import InvalidBufferError, PoolClosed, WouldBlock

__all__ = ["PinnedPool"]

_NEW, _OPEN, _CLOSING, _CLOSED = range(4)
_new_buffer = object.__new__


class PinnedPool:
    """A caching allocator of pinned host memory, for one event loop.

    ``async with PinnedPool() as pool:`` starts the backend (off the loop) and binds the pool to
    the running loop; leaving unpins everything.  ``free``, ``record_stream`` and
    ``allocate_blocking`` may be called from any thread; everything else belongs to the loop.

    Args:
        backend: ``"auto"`` (``cuda`` if usable, else ``host``), ``"cuda"``, ``"host"``, a Backend.
        max_bytes: cap on pinned bytes (``None``: none); under it, ``allocate`` waits instead.
        spin_s: opt-in: also poll events on the loop this long while callers wait (the README).
        scrub: zero each block a buffer gives back before anyone else gets it (multi-tenant).
        pinning: how new blocks are pinned, ``"auto"``/``"register"``/``"alloc"``.
        pin_threads: threads that fault new pages in (default one per core, up to 16).
        rounding: ``"fine"`` (four size classes per doubling) or ``"pow2"`` (the seed's rule).
        max_idle_bytes: unpin the oldest idle blocks past this many idle bytes (None: keep).
        idle_timeout_s: unpin blocks idle for longer than this, off the loop (None: keep).
        numa_node: put new blocks on this NUMA node; ``"auto"``: the device's (None: the kernel's).
        device: the CUDA device the pool serves (None: the one current where it opens, else 0).
        segment_bytes: the most one pinning covers when ``reserve`` carves blocks out of it.
    """

    def __init__(
        self,
        backend: str | Backend = "auto",
        *,
        max_bytes: int | None = None,
        spin_s: float = 0.0,
        scrub: bool = False,
        pinning: str = "auto",
        pin_threads: int | None = None,
        rounding: str = "fine",
        max_idle_bytes: int | None = None,
        idle_timeout_s: float | None = None,
        numa_node: int | str | None = None,
        device: int | None = None,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        self._state = _NEW  # (first: __del__ reads it even when a check below fails)
        how = check.as_pinning(pinning, pin_threads, numa_node, device)
        self._spec = (check.as_backend(backend), how)
        self._max_bytes = check.as_max_bytes(max_bytes)
        self._spin_s = check.as_seconds(spin_s, "spin_s")
        self._scrub = check.as_flag(scrub, "scrub")
        self._segment_bytes = check.as_positive(segment_bytes, "segment_bytes")
        #: the largest request: the cap, else this machine's memory (pinned memory is resident)
        self._cap = check.physical_memory() if self._max_bytes is None else self._max_bytes
        self._rt: Runtime = NOT_OPEN
        self._thread_id = -1  # the loop thread, once open
        self._hit_thread = -1  # the same, while open: the hit paths' one check of both
        self._cache = Cache(self._max_bytes, check.as_rounding(rounding))
        self._trim = Trim(self._cache, *check.as_trim(max_idle_bytes, idle_timeout_s))
        self._free = self._cache.free  # the hot path's one attribute lookup
        #: where a buffer's ``free`` puts a block with no streams itself (open, no scrub, no
        #: trimming: nothing else to do for it), else ``None``
        self._back: FreeList | None = None if self._scrub or self._trim.on else self._free
        self._counts = Counters()
        self._lot: ParkingLot[Block | Plan] = ParkingLot(self._pass_on, self._counts.waited)
        self._waiters = self._lot.queue  # the hot paths' "is anybody queued?"
        self._growth = Growth(self._cache, self._counts, self._return_blocks, self._open_now)
        self._graphs = GraphHolds(self._graph_done)
        self._reserves = Reserves()

    async def open(self) -> PinnedPool:
        """Start the pool on the running loop (``async with`` does this)."""
        if self._state != _NEW:
            raise RuntimeError("this PinnedPool was already opened; a pool opens once")
        self._state = _OPEN
        try:
            rt = await Runtime.start(*self._spec, self._counts)
        except BaseException:
            self._state = _CLOSED
            raise
        self._rt, self._thread_id = rt, rt.port.thread_id
        self._hit_thread = self._thread_id
        self._trim.start(rt.port, rt.pinning, self._unpinned)
        self._graphs.start(rt.backend, rt.port, self._thread_id)
        return self

    async def aclose(self) -> None:
        """Close: wake waiters with :class:`PoolClosed`, wait for copies, pins and scrubs in
        flight, unpin idle memory (buffers still out: once freed).  Always finishes: a cancelled
        close can be retried, and a failing unpin is raised only once all else is done."""
        if self._state == _NEW or self._rt is NOT_OPEN:
            self._state = _CLOSED
        if self._state == _CLOSED:
            return
        self._check_loop()
        rt, self._state, self._hit_thread = self._rt, _CLOSING, -1
        self._trim.stop()
        self._reserves.close(PoolClosed("the pool was closed while this reserve pinned"))
        self._lot.close(PoolClosed("the pool was closed while this call waited for a block"))
        try:
            busy = (rt.watcher.pending, self._growth.pinning, rt.pinning.background)
            while any(b.count for b in busy):  # (one ending may start another: wait for all)
                for b in busy:
                    await b.wait_idle()  # copies, pins (adopted if their caller left), scrubs
            victims = self._cache.take_idle(closing=True)
            self._state, self._back = _CLOSED, None
            warn_live(self, self._cache.registry.blocks())
            await self._unpin_idle(victims)
        finally:
            if self._state == _CLOSED:
                rt.close()

    async def __aenter__(self) -> PinnedPool:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def allocate(self, nbytes: int, *, timeout: float | None = None) -> PinnedBuffer:
        """A buffer of at least ``nbytes`` pinned bytes.

        Reuses the smallest idle block that fits; else pins one of ``nbytes``'s size class (or
        of ``nbytes`` at the cap's edge), unpinning idle blocks that are too small if the cap is
        in the way; else waits, first come first served, for a block to come back.

        Raises:
            TypeError / ValueError: ``nbytes`` is not an int, is negative, or exceeds max_bytes.
            TimeoutError: no block within ``timeout`` seconds (nothing is left queued or held).
            PoolClosed: the pool is closed, or closed while waiting.
            PinnedMemoryError: the system refused to pin more memory.
            RuntimeError: called from a thread or loop the pool does not belong to.
        """
        # The cache hit (allocate_nowait's, which hands it out), checked in one expression.
        if (
            type(nbytes) is int
            and timeout is None
            and get_ident() == self._hit_thread
            and not self._waiters
            and self._free.hit.get(nbytes)
        ):
            return self.allocate_nowait(nbytes)
        return await self._allocate_checked(nbytes, timeout)

    async def _allocate_checked(self, nbytes: object, timeout: object) -> PinnedBuffer:
        size = self._check_request(nbytes)
        deadline = anyio.current_time() + check.as_timeout(timeout)
        if size == 0:
            return PinnedBuffer(self, None, 0)
        grant: Block | Plan | None = None
        if not self._lot:  # a cached block, else room to grow
            grant = self._free.take(size) or self._cache.plan(size)
        if grant is None:
            grant = await self._wait(size, deadline)
        if isinstance(grant, Block):
            return self._hand_out(grant, size, 1)
        buf = self._hand_out(await self._growth.grow(self._rt.pinning, grant, deadline), size)
        if self._waiters:  # unpinning bigger victims than the block may have left room
            self._serve()
        return buf

    async def reserve(
        self,
        nbytes: int,
        *,
        block_bytes: int | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> int:
        """Pin ``nbytes`` into the cache before traffic comes, as blocks of exactly
        ``block_bytes`` (default one block; the last one the remainder) carved from segments of
        up to ``segment_bytes``, one pinning each, off the loop, under the cap.
        ``progress(done, total)`` runs on the loop after each segment; a cancel keeps the whole
        segments pinned so far.  Returns the bytes pinned: less than ``nbytes`` where the cap
        is full (no idle block is unpinned for it).

        Raises ``PinnedMemoryError`` where the system refuses to pin more (what was pinned is
        kept), and ``PoolClosed`` where the pool closed meanwhile."""
        return await self._reserving(nbytes, block_bytes, progress).run()

    def start_reserve(
        self,
        nbytes: int,
        *,
        block_bytes: int | None = None,
        progress: Callable[[int, int], object] | None = None,
    ) -> Reserving:
        """``reserve`` in the background, for bringing a tier up while serving: returns at
        once a :class:`Reserving` (``done_bytes``, ``done()``, ``await``-able, ``cancel()``);
        ``stats()`` counts it until it ends, and closing the pool cancels it."""
        job = self._reserving(nbytes, block_bytes, progress)
        self._rt.port.spawn(job.run_detached)
        return job

    def _reserving(
        self, nbytes: object, block_bytes: object, progress: Callable[[int, int], object] | None
    ) -> Reserving:
        total, block = check.as_reserve(nbytes, block_bytes, self._cap, self._max_bytes is None)
        check.as_callback(progress, "progress")
        self._check_request(0)
        segment = min(self._segment_bytes, self._rt.register_chunk_bytes())  # (no block across)
        run = partial(self._growth.reserve, self._rt.pinning, total, block, segment)
        return self._reserves.track(Reserving(total, run, progress))

    def allocate_nowait(self, nbytes: int) -> PinnedBuffer:
        """A cached block at once, or :class:`WouldBlock` wherever ``allocate`` would wait, and
        also where it would pin (which blocks for up to seconds: no call here may)."""
        # The hit, checked in one expression: only the checks that can fail on it.  A size in
        # ``hit`` passed _check_request when ``take`` first saw it, and a pop from its class's
        # list is the best fit (FreeList).  Each call saved here is ~5% of a hit and a free.
        free = self._free
        if not (
            type(nbytes) is int
            and get_ident() == self._hit_thread
            and not self._waiters
            and (same := free.hit.get(nbytes))
        ):
            return self._nowait_checked(nbytes)
        block = same.pop()
        free.nbytes -= block.size
        block.state = ALLOCATED
        self._counts.cache_hits += 1
        buf = _new_buffer(PinnedBuffer)  # (PinnedBuffer.__init__, inline)
        buf._owner = self
        buf._block = block
        buf._nbytes = nbytes
        buf._live = [True]
        buf._anchor = None
        return buf

    def _nowait_checked(self, nbytes: object) -> PinnedBuffer:
        size = self._check_request(nbytes)
        if size == 0:
            return PinnedBuffer(self, None, 0)
        if self._waiters:
            raise WouldBlock(f"{len(self._lot)} callers are queued ahead; nobody overtakes")
        block = self._free.take(size)
        if block is None:
            raise WouldBlock(f"no idle block of at least {size} bytes; await allocate() instead")
        return self._hand_out(block, size, 1)

    def allocate_blocking(self, nbytes: int, *, timeout: float | None = None) -> PinnedBuffer:
        """``allocate`` for plain threads (e.g. sync data-loader workers): blocks the caller."""
        wait, _ = check.as_timeout(timeout), check.as_size(nbytes)
        self._check_open()
        if not self._rt.port.alive():
            raise PoolClosed("the pool's event loop has stopped")
        if get_ident() == self._thread_id:
            raise RuntimeError("allocate_blocking() on the pool's own loop thread would deadlock")
        run = partial(self.allocate, nbytes, timeout=timeout)
        try:  # the pool's own timeout runs on the loop; this one bounds the wait for the loop
            return self._rt.port.call(run, timeout=wait, on_orphan=PinnedBuffer.free)
        except (LoopGone, concurrent.futures.CancelledError):
            raise PoolClosed("the pool's event loop has stopped") from None

    @contextlib.asynccontextmanager
    async def buffer(
        self, nbytes: int, *, timeout: float | None = None
    ) -> AsyncIterator[PinnedBuffer]:
        """``async with pool.buffer(n) as buf:`` allocates, and frees on exit."""
        buf = await self.allocate(nbytes, timeout=timeout)
        try:
            yield buf
        finally:
            if not buf.freed:
                buf.free()

    def free(self, buf: PinnedBuffer) -> None:
        """Give a buffer back: synchronous, never blocks, safe from any thread.  The block is
        idle again once the streams recorded on it have passed their events and no view is left.

        Raises:
            InvalidBufferError: freed twice, or not from this pool.
        """
        if not isinstance(buf, PinnedBuffer):
            raise TypeError(f"free() takes a PinnedBuffer, not {type(buf).__name__}")
        if buf.pool is not self:
            raise InvalidBufferError("this buffer belongs to another pool")
        buf.free()

    def record_stream(self, obj: object, stream: object) -> bool:
        """Mark memory as used by work queued on ``stream`` (the seed's ``record_event``).

        ``obj`` is a :class:`PinnedBuffer`, an int address, or anything with ``data_ptr()`` or
        ``__array_interface__``; an address anywhere inside a live block counts.  Returns
        ``False`` for memory that is not a live allocation of this pool.  On a stream capturing
        a CUDA graph, the block is kept until that graph is destroyed (its replays read it).
        """
        if isinstance(obj, PinnedBuffer):
            return obj.record_stream(stream) if obj.pool is self else self._record(None, stream)
        return self._record(self._cache.find_live(check.pointer_of(obj)), stream)

    def process_events(self) -> int:
        """Return every block whose events have completed; how many came back."""
        if self._rt is NOT_OPEN:
            return 0
        self._check_loop()
        before = self._counts.returned
        self._rt.watcher.poll()
        return self._counts.returned - before

    async def synchronize(self, stream: object = None) -> None:
        """Wait, without blocking the loop, for all work queued on ``stream`` so far."""
        self._check_loop()
        key = self._rt.backend.normalize_stream(stream)
        self._graphs.check_not_capturing(key)
        done = anyio.Event()
        self._rt.watcher.after((key,), done.set)
        await done.wait()

    async def empty_cache(self) -> int:
        """Unpin every idle block (off the loop, in steps with the loop running between); the
        bytes unpinned.  Raises the backend's error if a block could not be unpinned (it, and
        what was not tried yet, stays idle and counted)."""
        if self._state != _NEW:
            self._check_loop()
        if self._state != _OPEN:
            return 0
        self.process_events()
        return sum([await self._unpin_idle(units) for units in self._cache.idle_steps()])

    def copy_data(self, dest: int, src: int, count: int) -> None:
        """Copy ``count`` bytes from address ``src`` to ``dest`` (the seed's ``copy_data``)."""
        self._rt.backend.copy(*check.as_copy(dest, src, count))

    @property
    def backend(self) -> str:
        """The backend's name (``"cuda"``/``"host"``); before opening, what was asked for."""
        spec = self._spec[0] if self._rt is NOT_OPEN else self._rt.backend
        return spec if isinstance(spec, str) else spec.name

    @property
    def device(self) -> int | None:
        """The CUDA device the pool pins for (``None``: the host backend, or not yet known)."""
        asked = self._spec[1][3]
        return asked if self._rt is NOT_OPEN else getattr(self._rt.backend, "device", None)

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def closed(self) -> bool:
        return self._state >= _CLOSING

    def stats(self, *, timeout: float = 1.0) -> PoolStats:
        """A frozen snapshot of the pool's counters, at one instant; safe from any thread (a
        metrics scrape): from another thread it is taken on the pool's loop, waiting at most
        ``timeout`` seconds for it (``TimeoutError``: the loop is blocked)."""
        wait = check.as_timeout(timeout)
        if get_ident() == self._thread_id or self._state != _OPEN:
            return self._snapshot()
        return taken_on_loop(self._rt.port, self._snapshot, wait)

    def _snapshot(self) -> PoolStats:
        return self._counts.snapshot(backend=self.backend, max_bytes=self._max_bytes,
            waiters=len(self._lot), **self._rt.gauges(), **self._cache.gauges(),
            **self._reserves.gauges())  # fmt: skip

    def __repr__(self) -> str:
        s, state = self._snapshot(), ("new", "open", "closing", "closed")[self._state]
        return (
            f"<PinnedPool {s.backend} {state} reserved={s.reserved_bytes}/{s.max_bytes} "
            f"active={s.active_requests} free_blocks={s.free_blocks} waiters={s.waiters}>"
        )

    def __del__(self) -> None:
        if self._state == _OPEN and self._rt is not NOT_OPEN:
            with contextlib.suppress(Exception):  # (at interpreter exit, warnings may be gone)
                self._rt.abandon(repr(self), self, self._cache.take_idle(closing=True))

    def _check_request(self, nbytes: object) -> int:
        size = nbytes if type(nbytes) is int and nbytes >= 0 else check.as_size(nbytes)
        self._check_open()
        self._check_loop()
        if size > self._cap:
            raise ValueError(check.too_large(size, self._cap, self._max_bytes is None))
        return size

    def _open_now(self) -> bool:
        return self._state == _OPEN

    def _check_open(self) -> None:
        if self._state == _NEW:
            raise RuntimeError(NOT_OPEN_MESSAGE)
        if self._state != _OPEN:
            raise PoolClosed("the pool is closed")

    def _check_loop(self) -> None:
        if get_ident() != self._thread_id or not self._rt.port.is_current():
            raise RuntimeError(
                "this PinnedPool belongs to another event loop (the one it was opened on); only "
                "free() and allocate_blocking() may be called from other threads"
            )

    def _hand_out(self, block: Block, nbytes: int, hit: int = 0) -> PinnedBuffer:
        block.state = ALLOCATED
        self._counts.cache_hits += hit
        return PinnedBuffer(self, block, nbytes)

    async def _wait(self, size: int, deadline: float) -> Block | Plan:
        self._counts.waits.count += 1
        if self._spin_s:
            self._rt.watcher.spin(self._spin_s, self._lot.__bool__)
        return await self._lot.park(size, deadline)

    def _pass_on(self, grant: Block | Plan | None) -> None:
        """What a waiter that left was holding: pass it on (the lot's ``on_abandon``)."""
        if grant is None:
            self._serve()
        elif isinstance(grant, Block):
            self._return_block(grant)
        else:  # a plan that never ran: its victims are idle blocks again
            self._return_blocks(self._cache.undo(grant))

    def _serve(self) -> None:
        """Idle blocks, or room to grow, to waiters in FIFO order (the lot is open-only)."""
        self._lot.serve(self._grant)

    def _grant(self, size: int) -> Block | Plan | None:
        """The head waiter's: an idle block (marked taken at once), else room to grow."""
        block = self._free.take(size)
        if block is None:
            return self._cache.plan(size)
        block.state = ALLOCATED
        return block

    def _return_blocks(self, blocks: list[Block]) -> None:
        if self._state != _CLOSED and not self._trim.on:  # (in one step: a segment's blocks)
            self._free.add_many(blocks)
            self._counts.returned += len(blocks)
        else:
            for block in blocks:
                self._return_block(block)
        self._serve()

    def _call_on_loop(self, fn: Callable[[], object]) -> bool:
        return self._rt.port.post(fn)

    def _take_back(self, block: Block) -> None:
        """A buffer is done with ``block``: it comes back now, or after its streams' events
        (``PinnedBuffer.free`` puts it back itself in the commonest case)."""
        if self._state == _CLOSED:
            warn_late_free(block)
        if block.graphs or (block.streams and self._graphs.held_at_free(block)):
            block.state = PENDING  # (until the last graph that may replay work on it is gone)
            return
        if self._state == _CLOSED or not (block.streams or self._scrub):
            self._return_block(block)
            return
        rt, back = self._rt, partial(self._return_block, block)
        if self._scrub:
            back = partial(rt.pinning.scrub, block, back)
        block.state = PENDING  # (FREE once it is back: after its events, and its scrub)
        if not block.streams:
            return back()  # (scrub only)
        try:
            rt.watcher.after(block.streams, back)
        except Exception:  # no event could be recorded: wait for the streams themselves
            rt.pinning.return_after_streams(list(block.streams), back)
            raise
        finally:
            block.streams = NO_STREAMS
        if self._spin_s and self._lot:
            rt.watcher.spin(self._spin_s, self._lot.__bool__)

    def _return_block(self, block: Block) -> None:
        """An idle block: to the free list (and on to the first waiter); closed, unpinned."""
        if self._state == _CLOSED:
            unit = self._orphaned(block)
            if unit is not None:
                self._cache.reservations.unpinned(unit.size)
            return
        self._free.add(block)
        self._counts.returned += 1
        if self._waiters:
            self._serve()
        if self._trim.on:
            self._trim.returned(block)

    def _graph_done(self, block: Block) -> None:
        """The last graph holding freed ``block`` is gone: on to its streams and the free list."""
        if self._state == _CLOSED:
            self._return_block(block)
        else:
            self._take_back(block)

    def _orphaned(self, block: Block) -> Block | None:
        """Closed, or the loop gone (any thread, finalizers too): unpin once the block's streams
        are done, in the reaper thread; at interpreter exit, left to the process's end.  A block
        that a graph holds stays pinned (its release can no longer reach the loop); a carved
        block goes with the last of its segment.  What is unpinned (``None``: nothing yet)."""
        unit = self._cache.retire(block)
        if unit is not None and not block.graphs:
            self._rt.pinning.unpin_after_streams(unit)
        return unit

    def _record(self, block: Block | None, stream: object) -> bool:
        key = self._rt.backend.normalize_stream(stream)
        if block is None:
            return False
        self._graphs.record(block, key)
        if get_ident() == self._thread_id or not self._rt.port.post(add_stream, block, key):
            add_stream(block, key)  # (on the loop, or with the loop gone: no one to race with)
        return True

    def _prepare_torch(self) -> None:
        self._rt.backend.prepare_torch()

    async def _unpin_idle(self, victims: list[Block]) -> int:
        """Unpin idle units taken out of the cache (reserved until unpinned); their bytes."""
        if victims:
            await self._rt.pinning.unpin(victims, then=partial(self._unpinned, victims))
        return sum(b.size for b in victims)

    def _unpinned(self, victims: list[Block], still_pinned: list[Block]) -> None:
        kept = self._cache.unpinned(victims, still_pinned)
        if self._state == _CLOSED:  # still pinned, counted, and left to the process's end
            return
        self._return_blocks(kept)
