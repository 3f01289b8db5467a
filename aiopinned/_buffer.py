"""PinnedBuffer: one handed-out block, its views, and the state machine of its lifetime.

A buffer goes LIVE -> FREED -> RETIRED:

* ``free()`` (any thread) or the garbage collector ends LIVE.  ``_live`` is a one-shot token:
  ``list.pop`` is atomic, so exactly one of them wins, from any thread.
* Views (``memoryview``, NumPy, torch) share one *anchor* object over the memory.  The buffer is
  RETIRED, and its block handed back to its owner, once it is FREED *and* the anchor is gone:
  ``free()`` with a view still referenced defers the hand-back, it never pulls memory out from
  under a view.
* The check-and-retire step (``_settle``) runs on the owner's loop thread, and from anywhere else
  is posted there, so ``free()``, a dying view and the collector, racing from any threads, hand
  the block back once (``_anchor`` becomes ``_RETIRED``, on the loop only).  A buffer freed on
  the loop that never had a view retires at once: nothing else can hold its memory.  If the
  loop is gone, the owner is told the block is orphaned instead, by whichever thread settles
  last, under ``_ORPHANS`` (the loop cannot be running then, so the two never overlap).

The owner is reached through :class:`BlockOwner`, so this module imports nothing above it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import warnings
import weakref
from collections.abc import Callable, Sized
from threading import Lock, get_ident
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from ._block import FREE, Block
from .errors import InvalidBufferError

if TYPE_CHECKING:
    from ._freelist import FreeList

_ORPHANS = Lock()  # serializes retiring buffers whose loop is gone (any threads, rare)


def _retired() -> None:
    """The ``_anchor`` of a buffer whose block went back (never called)."""


_RETIRED: Any = _retired


class BlockOwner(Protocol):
    """What a buffer needs from the pool it came from."""

    #: the owner's loop thread (``-1`` before it opens)
    _thread_id: int
    #: where ``free`` may put a block with no streams itself (on the loop thread, with nobody
    #: waiting), else ``None``: ``_take_back`` does the rest
    _back: FreeList | None

    #: the callers waiting for a block (empty: nobody waits)
    @property
    def _waiters(self) -> Sized: ...

    def _call_on_loop(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` on the owner's loop soon (any thread); ``False`` if the loop is gone."""
        ...

    def _take_back(self, block: Block) -> None:
        """Loop thread: a buffer is done with ``block`` (freed, and no view is left)."""
        ...

    def _orphaned(self, block: Block) -> object:
        """Any thread, the loop gone: a buffer is done with ``block``."""
        ...

    def _record(self, block: Block | None, stream: object) -> bool:
        """The seed's ``record_event`` for ``block`` on ``stream``."""
        ...

    def _prepare_torch(self) -> None: ...


class PinnedBuffer:
    """``nbytes`` of pinned host memory from a :class:`~aiopinned.PinnedPool`.

    Views (:meth:`memoryview`, :meth:`numpy`, :meth:`torch`) keep the memory alive: ``free()``
    while a view is still referenced defers the block's return until the last view is gone.
    After ``free()`` no new view can be made (:class:`~aiopinned.InvalidBufferError`).

    A buffer that is garbage-collected without ``free()`` is freed then, with a
    ``ResourceWarning`` (which, with ``tracemalloc`` on, says where it was allocated).
    """

    __slots__ = ("__weakref__", "_anchor", "_block", "_live", "_nbytes", "_owner")

    def __init__(self, owner: BlockOwner, block: Block | None, nbytes: int) -> None:
        self._owner = owner
        self._block = block
        self._nbytes = nbytes
        self._live = [True]
        #: ``None`` (no view yet), a weak reference to the views' anchor, or ``_RETIRED`` (an
        #: empty buffer is retired from the start: it has no block to hand back)
        self._anchor: weakref.ref[Any] | None = None if block is not None else _RETIRED

    # -- what it is ---------------------------------------------------------------------------
    @property
    def ptr(self) -> int:
        """The address of the memory (0 for an empty buffer)."""
        return 0 if self._block is None else self._block.ptr

    @property
    def nbytes(self) -> int:
        """The size asked for."""
        return self._nbytes

    @property
    def capacity(self) -> int:
        """The size of the block behind the buffer (at least ``nbytes``)."""
        return 0 if self._block is None else self._block.size

    @property
    def freed(self) -> bool:
        return not self._live

    @property
    def pool(self) -> BlockOwner:
        """The :class:`~aiopinned.PinnedPool` the buffer came from."""
        return self._owner

    # -- views --------------------------------------------------------------------------------
    def memoryview(self) -> memoryview:
        """A writable ``memoryview`` of the ``nbytes`` requested (format ``'B'``)."""
        return memoryview(self._get_anchor()).cast("B")

    def numpy(self, dtype: Any = None, shape: int | tuple[int, ...] | None = None) -> Any:
        """A NumPy array over the memory (``uint8`` and flat unless told otherwise)."""
        import numpy as np

        dt = np.dtype(np.uint8 if dtype is None else dtype)
        shape, count = self._shape_for(dt.itemsize, shape)
        return np.frombuffer(self.memoryview(), dtype=dt, count=count).reshape(shape)

    def torch(self, dtype: Any = None, shape: int | tuple[int, ...] | None = None) -> Any:
        """A CPU ``torch.Tensor`` over the memory; ``is_pinned()`` on the cuda backend."""
        import torch

        dt = torch.uint8 if dtype is None else dtype
        if not isinstance(dt, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, not {type(dt).__name__}")
        shape, count = self._shape_for(dt.itemsize, shape)
        self._owner._prepare_torch()
        mv = self.memoryview()
        if count == 0:
            return torch.empty(shape, dtype=dt)
        return torch.frombuffer(mv, dtype=dt, count=count).view(shape)

    def _get_anchor(self) -> Any:
        if not self._live:
            raise InvalidBufferError("this buffer was freed; no new view can be made")
        anchor = None if self._anchor is None else self._anchor()
        if anchor is None:
            if self._block is None:
                return bytearray()
            anchor = (ctypes.c_ubyte * self._nbytes).from_address(self._block.ptr)
            self._anchor = weakref.ref(anchor)
            # The finalizer holds the buffer: views keep the buffer (so the block) alive.
            fin = weakref.finalize(anchor, self._settle_soon)
            fin.atexit = False
        return anchor

    def _shape_for(
        self, itemsize: int, shape: int | tuple[int, ...] | None
    ) -> tuple[tuple[int, ...], int]:
        if shape is None:
            if self._nbytes % itemsize:
                raise ValueError(
                    f"{self._nbytes} bytes are not a whole number of {itemsize}-byte items"
                )
            return (self._nbytes // itemsize,), self._nbytes // itemsize
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise ValueError(f"shape must be non-negative ints, not {shape!r}")
        count = math.prod(dims)
        if count * itemsize > self._nbytes:
            raise ValueError(
                f"shape {dims} of {itemsize}-byte items needs {count * itemsize} bytes; "
                f"the buffer has {self._nbytes}"
            )
        return dims, count

    # -- lifetime -----------------------------------------------------------------------------
    def record_stream(self, stream: object) -> bool:
        """Mark the memory as used by work queued on ``stream`` (see ``PinnedPool.record_stream``).

        Raises:
            InvalidBufferError: the buffer was freed (record streams before ``free()``).
        """
        if not self._live:
            raise InvalidBufferError("this buffer was freed; record streams before free()")
        return self._owner._record(self._block, stream)

    def free(self) -> None:
        """Give the memory back to the pool.  Synchronous, never blocks, safe from any thread.

        Raises:
            InvalidBufferError: the buffer was already freed.
        """
        try:
            self._live.pop()
        except IndexError:
            if self._block is None:
                return  # an empty buffer: freeing it again is no error either
            raise InvalidBufferError("this buffer was already freed") from None
        owner = self._owner
        if get_ident() != owner._thread_id:
            self._settle_soon()
        elif self._anchor is not None:  # a view was made (or the buffer is empty)
            self._settle()
        else:  # the hit path: on the loop, no view was ever made, so it retires now
            self._anchor = _RETIRED
            block: Block = self._block  # type: ignore[assignment]  # (not empty: anchor None)
            back = owner._back
            if (
                back is None
                or block.streams
                or owner._waiters
                or (same := block.home) is None
                or same
            ):
                owner._take_back(block)
            else:  # (FreeList.add's commonest case, inline: none of its size is idle)
                block.state = FREE
                same.append(block)
                back.nbytes += block.size

    def _retiring(self) -> bool:
        """Freed, not yet retired, and no view left: retire now (marks it retired)."""
        anchor = self._anchor
        if self._live or anchor is _RETIRED or (anchor is not None and anchor() is not None):
            return False
        self._anchor = _RETIRED
        return True

    def _settle(self) -> None:
        """Loop thread: hand the block back if this is the moment the buffer retires."""
        if self._retiring():
            self._owner._take_back(self._block)  # type: ignore[arg-type]  # (see free())

    def _settle_soon(self) -> None:
        """Any thread, finalizers included: ``_settle`` on the owner's loop, or, the loop gone,
        here (nothing else can run it any more)."""
        if self._owner._call_on_loop(self._settle):
            return
        with _ORPHANS:
            if not self._retiring():
                return
        self._owner._orphaned(self._block)  # type: ignore[arg-type]

    async def __aenter__(self) -> PinnedBuffer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live:
            self.free()

    def _free_in_finalizer(self) -> bool:
        """Free from a finalizer (posted to the loop: no owner state is touched here); whether
        this call freed it."""
        if self._block is None or not self._live:
            return False
        try:
            self._live.pop()
        except IndexError:
            return False
        with contextlib.suppress(Exception):  # (at interpreter shutdown)
            self._settle_soon()
        return True

    def __del__(self) -> None:
        if self._block is None or not self._live:  # (the hot path: freed buffers, no call)
            return
        if self._free_in_finalizer():
            with contextlib.suppress(Exception):  # (at interpreter shutdown, warnings may be gone)
                warnings.warn(
                    f"PinnedBuffer of {self._nbytes} bytes was never freed; free() it, or use "
                    "'async with pool.buffer(n)'",
                    ResourceWarning,
                    stacklevel=1,
                    source=self,
                )

    def __repr__(self) -> str:
        state = "freed" if not self._live else "live"
        return (
            f"<PinnedBuffer {state} ptr={self.ptr:#x} nbytes={self._nbytes} "
            f"capacity={self.capacity}>"
        )
