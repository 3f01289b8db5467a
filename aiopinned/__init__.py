"""aiopinned: an asyncio-native caching allocator for CUDA pinned host memory.

>>> async with PinnedPool() as pool:            # doctest: +SKIP
...     async with pool.buffer(1 << 20) as buf:
...         buf.numpy()[:] = 1
"""

from ._buffer import PinnedBuffer
from ._cupy import set_cupy_pinned_allocator
from ._pool import PinnedPool
from ._stats import PoolStats
from .backends import HostStream
from .errors import (
    AiopinnedError,
    CudaError,
    InvalidBufferError,
    PinnedMemoryError,
    PoolClosed,
    WouldBlock,
)

__all__ = [
    "AiopinnedError",
    "CudaError",
    "HostStream",
    "InvalidBufferError",
    "PinnedBuffer",
    "PinnedMemoryError",
    "PinnedPool",
    "PoolClosed",
    "PoolStats",
    "WouldBlock",
    "set_cupy_pinned_allocator",
]

__version__ = "0.1.0"
