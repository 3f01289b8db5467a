"""Let CuPy take its pinned memory from a PinnedPool."""

from __future__ import annotations

import threading
from typing import Any

from ._buffer import PinnedBuffer
from ._pool import PinnedPool


class _CupyMemory:
    """What ``cupy.cuda.PinnedMemoryPointer`` needs: ``ptr`` and ``size``, alive as long as used.

    CuPy holds this object for as long as its array lives; when CuPy drops it, the buffer is
    freed (from whatever thread CuPy drops it on).
    """

    __slots__ = ("__weakref__", "buffer", "ptr", "size")

    def __init__(self, buffer: PinnedBuffer) -> None:
        self.buffer = buffer
        self.ptr = buffer.ptr
        self.size = buffer.nbytes

    def __del__(self) -> None:
        self.buffer._free_in_finalizer()  # freed as a finalizer may: posted, never settled here


def set_cupy_pinned_allocator(pool: PinnedPool | None) -> None:
    """Make CuPy allocate pinned memory from ``pool`` (``None`` restores CuPy's default pool).

    CuPy's allocator API is synchronous.  On the pool's loop thread a cached block is handed out
    at once; where the pool would have to pin or wait, the call raises
    :class:`~aiopinned.WouldBlock` instead of stalling the loop, so warm the pool first (allocate
    and free the sizes you need).  From other threads it blocks as ``allocate_blocking`` does.
    """
    import cupy

    if pool is None:
        cupy.cuda.set_pinned_memory_allocator(cupy.get_default_pinned_memory_pool().malloc)
        return
    if not isinstance(pool, PinnedPool):
        raise TypeError(
            f"set_cupy_pinned_allocator() takes a PinnedPool, not {type(pool).__name__}"
        )

    def malloc(size: int) -> Any:
        if threading.get_ident() == pool._thread_id:
            buf = pool.allocate_nowait(size)
        else:
            buf = pool.allocate_blocking(size)
        return cupy.cuda.PinnedMemoryPointer(_CupyMemory(buf), 0)

    cupy.cuda.set_pinned_memory_allocator(malloc)


__all__ = ["set_cupy_pinned_allocator"]
