"""The exceptions aiopinned raises.

Timeouts raise the builtin :class:`TimeoutError`; bad arguments raise :class:`TypeError` or
:class:`ValueError`.  Everything else the library raises on its own account derives from
:class:`AiopinnedError`.
"""

from __future__ import annotations

__all__ = [
    "AiopinnedError",
    "CudaError",
    "InvalidBufferError",
    "PinnedMemoryError",
    "PoolClosed",
    "WouldBlock",
]


class AiopinnedError(Exception):
    """Base class of the errors aiopinned raises."""


class WouldBlock(AiopinnedError):
    """``allocate_nowait`` could not hand out a block without waiting or pinning."""


class PoolClosed(AiopinnedError):
    """The pool is closed (or was closed while the caller waited for a block)."""


class InvalidBufferError(AiopinnedError):
    """A buffer was used after ``free()``, freed twice, or given to a pool it is not from."""


class PinnedMemoryError(AiopinnedError, MemoryError):
    """The system refused to pin (page-lock) more host memory."""


class CudaError(AiopinnedError, RuntimeError):
    """A CUDA runtime call failed; the message names the call and the CUDA error."""
