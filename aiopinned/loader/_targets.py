"""Where loaded bytes go: a CUDA device (torch tensors, copies queued with ``cudaMemcpyAsync`` on
a few streams), or host memory (NumPy arrays, copies queued on ``HostStream``s, as the host
backend's stand-in for a device).  Copies go by address: no view of a pool buffer outlives the
call that queues its copy, so the buffer can be freed (with ``record_stream``) at once.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Any

from ..backends import HostStream
from ._format import DTYPES, Entry

#: safetensors dtype -> torch dtype attribute
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "C64": "complex64", "I64": "int64", "U64": "uint64", "F64": "float64",
}  # fmt: skip


class _Target:
    """What both targets share: copy streams, each synchronized at close."""

    streams: Sequence[Any]  # (HostStream or torch.cuda.Stream: both have synchronize())

    def close(self) -> None:
        for stream in self.streams:
            stream.synchronize()


class HostTarget(_Target):
    """NumPy arrays in ordinary memory; the pool's backend is ``host``."""

    backend, device = "host", None

    def __init__(self, streams: int) -> None:
        self.streams = [HostStream(f"aiopinned-load-{i}") for i in range(streams)]

    @staticmethod
    def check(entries: Sequence[Entry]) -> None:
        """Every tensor has a NumPy dtype (also before a target is made: ``_shared``)."""
        for entry in entries:
            if DTYPES[entry.dtype][1] is None:
                raise ValueError(
                    f"tensor {entry.name!r} is {entry.dtype}, which NumPy has no dtype for: load "
                    "it to a CUDA device, or leave it out (names=)"
                )

    def empty(self, nbytes: int) -> Any:
        import numpy as np

        return np.empty(nbytes, dtype=np.uint8)

    def copy(self, dest: Any, at: int, src: int, nbytes: int, stream: Any) -> None:
        stream.launch(ctypes.memmove, dest.ctypes.data + at, src, nbytes)

    def marker(self, stream: Any) -> Any:
        done = threading.Event()
        stream.launch(done.set)
        return done

    def done(self, marker: Any) -> bool:
        return bool(marker.is_set())

    def wait(self, marker: Any) -> None:
        marker.wait()

    def tensor(self, dest: Any, at: int, entry: Entry) -> Any:
        import numpy as np

        if entry.nbytes == 0:
            return np.empty(entry.shape, dtype=DTYPES[entry.dtype][1])
        dtype = np.dtype(DTYPES[entry.dtype][1])
        count = entry.nbytes // dtype.itemsize
        return np.frombuffer(dest, dtype, count, at).reshape(entry.shape)


class CudaTarget(_Target):
    """torch tensors on one CUDA device; the pool's backend is ``cuda`` on that device."""

    backend = "cuda"

    def __init__(self, device: Any, streams: int) -> None:
        import torch

        from ..backends._cudart import check, rt

        self._torch, self._check, self._rt = torch, check, rt
        where = torch.device(device)
        if where.type != "cuda":
            raise ValueError(f"device must be a CUDA device or None, not {device!r}")
        self.device = torch.cuda.current_device() if where.index is None else where.index
        self._where = torch.device("cuda", self.device)
        with torch.cuda.device(self.device):
            self.streams = [torch.cuda.Stream() for _ in range(streams)]
        self._h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice

    @staticmethod
    def check(entries: Sequence[Entry]) -> None:
        """This torch has every tensor's dtype (also before a target is made: ``_shared``)."""
        import torch

        for entry in entries:
            if not hasattr(torch, TORCH_DTYPES[entry.dtype]):
                raise ValueError(f"tensor {entry.name!r}: this torch has no {entry.dtype}")

    def empty(self, nbytes: int) -> Any:
        dest = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._where)
        for stream in self.streams:  # (torch's allocator: not reused before the copies end)
            dest.record_stream(stream)
        return dest

    def copy(self, dest: Any, at: int, src: int, nbytes: int, stream: Any) -> None:
        with self._torch.cuda.device(self.device):
            self._check(
                self._rt.cudaMemcpyAsync(
                    dest.data_ptr() + at, src, nbytes, self._h2d, stream.cuda_stream
                ),
                f"cudaMemcpyAsync({nbytes})",
            )

    def marker(self, stream: Any) -> Any:
        event = self._torch.cuda.Event()
        event.record(stream)
        return event

    def done(self, marker: Any) -> bool:
        return bool(marker.query())

    def wait(self, marker: Any) -> None:
        marker.synchronize()

    def tensor(self, dest: Any, at: int, entry: Entry) -> Any:
        torch = self._torch
        dtype = getattr(torch, TORCH_DTYPES[entry.dtype])
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype, device=self._where)
        raw = dest[at : at + entry.nbytes]
        if at % DTYPES[entry.dtype][0]:
            raw = raw.clone()  # (not aligned to its element: a storage of its own)
        return raw.view(dtype).view(entry.shape)


def make_target(device: Any, streams: int) -> HostTarget | CudaTarget:
    """``None``: the host; else a CUDA device (``"cuda"``, ``"cuda:1"``, an index, a
    ``torch.device``)."""
    if device is None:
        return HostTarget(streams)
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ValueError("loading to a CUDA device needs torch: pip install torch") from None
    return CudaTarget(device, streams)
