"""PinnedBuffer: one handed-out block, its views, and its lifetime."""

from __future__ import annotations

import ctypes
import math
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import InvalidBufferError

if TYPE_CHECKING:
    from ._block import Block
    from ._pool import PinnedPool


class PinnedBuffer:
    """``nbytes`` of pinned host memory from a :class:`~aiopinned.PinnedPool`.

    Views (:meth:`memoryview`, :meth:`numpy`, :meth:`torch`) all share one anchor object over the
    memory.  The anchor lives as long as any view does, and the block goes back to the pool only
    when the buffer has been freed *and* the anchor is gone: ``free()`` with a view still
    referenced defers the return, it never pulls memory out from under a view.  After ``free()``
    no new view can be made (:class:`~aiopinned.InvalidBufferError`).

    A buffer that is garbage-collected without ``free()`` is freed then.
    """

    __slots__ = ("__weakref__", "_anchor", "_block", "_live", "_nbytes", "_pool", "_retired")

    def __init__(self, pool: PinnedPool, block: Block | None, nbytes: int) -> None:
        self._pool = pool
        self._block = block
        self._nbytes = nbytes
        # One-shot token: ``list.pop`` is atomic, so exactly one free() wins, from any thread.
        self._live = [True]
        self._anchor: weakref.ref[Any] | None = None
        self._retired = False

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
    def pool(self) -> PinnedPool:
        return self._pool

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
        self._pool._require_backend().prepare_torch()
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
            fin = weakref.finalize(anchor, self._pool._views_gone, self)
            fin.atexit = False
        return anchor

    def _views_alive(self) -> bool:
        return self._anchor is not None and self._anchor() is not None

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
        """Mark the memory as used by work queued on ``stream`` (see ``PinnedPool.record_stream``)."""
        return self._pool.record_stream(self, stream)

    def free(self) -> None:
        """Give the memory back to the pool (see ``PinnedPool.free``)."""
        self._pool.free(self)

    async def __aenter__(self) -> PinnedBuffer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live:
            self._pool.free(self)

    def __del__(self) -> None:
        if self._block is not None and self._live:
            try:
                self._pool._free_from_finalizer(self)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def __repr__(self) -> str:
        state = "freed" if not self._live else "live"
        return (
            f"<PinnedBuffer {state} ptr={self.ptr:#x} nbytes={self._nbytes} "
            f"capacity={self.capacity}>"
        )
