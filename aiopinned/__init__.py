"""aiopinned: an asyncio-native caching allocator for CUDA pinned host memory.

>>> async with PinnedPool() as pool:            # doctest: +SKIP
...     async with pool.buffer(1 << 20) as buf:
...         buf.numpy()[:] = 1
"""

from ._bringup import Reserving
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
from .loader import FileReader, ReadReport, load_safetensors, stream_safetensors
from .pages import PinnedPages

__all__ = [
    "AiopinnedError",
    "CudaError",
    "FileReader",
    "HostStream",
    "InvalidBufferError",
    "PinnedBuffer",
    "PinnedMemoryError",
    "PinnedPages",
    "PinnedPool",
    "PoolClosed",
    "PoolStats",
    "ReadReport",
    "Reserving",
    "WouldBlock",
    "load_safetensors",
    "set_cupy_pinned_allocator",
    "stream_safetensors",
]

__version__ = "0.1.0"
