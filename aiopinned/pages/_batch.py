"""Queuing many copies at once: the checks on their pieces, and the ways to queue them.

A KV page is small (64 KiB per layer for Llama-shaped heads), and a request's prefix is hundreds
of pages scattered over a tier, so the cost of queuing a copy decides the outcome.  Everything
here works on NumPy arrays of addresses and sizes, never a Python object per piece:

* ``check``: every piece is inside its page, has a device address that is not null, and no two
  destinations overlap (the copies of a batch run in no set order) -- a ``ValueError`` before
  anything is queued;
* ``CudaCopies``: ``cudaMemcpyBatchAsync`` (CUDA 12.8 and later: one driver call for the whole
  batch), or one ``cudaMemcpyAsync`` per piece (``method="loop"``, the legacy default stream,
  or a driver without batches);
* ``HostCopies``: the host backend's stand-in, the pieces ``memmove``d in a ``HostStream``'s
  order, so that CI runs the same checks and the same stream semantics.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

import numpy as np

from ..backends import HostStream
from ..errors import CudaError

log = logging.getLogger("aiopinned")

METHODS = ("auto", "batch", "loop")


def as_addresses(values: Any, what: str) -> np.ndarray:
    """A 1-D array of non-negative integers (int64), or a ``TypeError``/``ValueError``."""
    arr = np.asarray(values)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what} must be a sequence or 1-D array of ints, not {arr.dtype} "
                        f"of shape {arr.shape}")  # fmt: skip
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} has a negative value ({int(arr.min())})")
    return arr


def check(
    pages: np.ndarray, device: np.ndarray, sizes: np.ndarray, count: int, page_bytes: int,
    to_device: bool,
) -> None:  # fmt: skip
    """The pieces' checks (see the module's docstring); raises ``ValueError`` naming the first
    bad piece."""
    if not pages.size == device.size == sizes.size:
        raise ValueError(f"{pages.size} pages, {device.size} device addresses and {sizes.size} "
                         "sizes: one each per piece")  # fmt: skip
    if not pages.size:
        return
    bad = np.flatnonzero(pages >= count)
    if bad.size:
        raise ValueError(f"piece {bad[0]}: page {pages[bad[0]]} is out of range ({count} pages)")
    bad = np.flatnonzero((sizes <= 0) | (sizes > page_bytes))
    if bad.size:
        raise ValueError(f"piece {bad[0]}: {sizes[bad[0]]} bytes is out of a page's range "
                         f"(1 to {page_bytes})")  # fmt: skip
    bad = np.flatnonzero(device == 0)
    if bad.size:
        raise ValueError(f"piece {bad[0]}: the device address is null")
    if to_device:
        order = np.argsort(device, kind="stable")
        start, end = device[order], device[order] + sizes[order]
        clash = np.flatnonzero(start[1:] < end[:-1])
        if clash.size:
            a, b = sorted((int(order[clash[0]]), int(order[clash[0] + 1])))
            raise ValueError(f"pieces {a} and {b} write overlapping device memory")
    else:
        ordered = np.sort(pages)
        clash = np.flatnonzero(ordered[1:] == ordered[:-1])
        if clash.size:
            page = int(ordered[clash[0]])
            twice = np.flatnonzero(pages == page)[:2]
            raise ValueError(f"pieces {twice[0]} and {twice[1]} both write page {page}")


class HostCopies:
    """The host backend: the pieces copied in order on a ``HostStream``."""

    def queue(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: Any,
              method: str) -> None:  # fmt: skip
        if not isinstance(stream, HostStream):
            raise TypeError(f"the host backend copies on a HostStream, not {type(stream).__name__}")
        stream.launch(_copy_all, dsts.tolist(), srcs.tolist(), sizes.tolist())


def _copy_all(dsts: list[int], srcs: list[int], sizes: list[int]) -> None:
    for dst, src, n in zip(dsts, srcs, sizes, strict=True):
        ctypes.memmove(dst, src, n)


class CudaCopies:
    """One CUDA device's copies: batched where the driver can, else one call per piece."""

    def __init__(self, device: int) -> None:
        from ..backends._cudart import rt

        self.device = device
        self._rt = rt
        self._batch: bool | None = None if hasattr(rt, "cudaMemcpyBatchAsync") else False
        self._lock = threading.Lock()
        attr = rt.cudaMemcpyAttributes()
        attr.srcAccessOrder = rt.cudaMemcpySrcAccessOrder.cudaMemcpySrcAccessOrderStream
        self._attrs = [attr]

    def queue(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: Any,
              method: str) -> None:  # fmt: skip
        from ..backends._cudart import check, stream_handle

        rt, handle = self._rt, stream_handle(stream)
        capturing = check(rt.cudaStreamIsCapturing(handle), "cudaStreamIsCapturing")
        if capturing != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone:
            raise ValueError("batched copies cannot be captured in a CUDA graph (the driver has "
                             "no graph node for them): queue them outside the capture")  # fmt: skip
        previous = check(rt.cudaGetDevice(), "cudaGetDevice")
        if previous != self.device:
            check(rt.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        try:
            batch = method == "batch" or (method == "auto" and self._batch is not False)
            if batch and handle not in (0, 1) and self._queue_batch(dsts, srcs, sizes, handle,
                                                                   method):  # fmt: skip
                return
            kind = rt.cudaMemcpyKind.cudaMemcpyDefault
            for dst, src, n in zip(dsts.tolist(), srcs.tolist(), sizes.tolist(), strict=True):
                check(rt.cudaMemcpyAsync(dst, src, n, kind, handle), f"cudaMemcpyAsync({n})")
        finally:
            if previous != self.device:
                check(rt.cudaSetDevice(previous), f"cudaSetDevice({previous})")

    def _queue_batch(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, handle: int,
                     method: str) -> bool:  # fmt: skip
        """``cudaMemcpyBatchAsync``; ``False`` where the driver has none (``auto`` then loops,
        and says so once)."""
        from ..backends._cudart import error_text

        rt, n = self._rt, len(sizes)
        (err,) = rt.cudaMemcpyBatchAsync(dsts.tolist(), srcs.tolist(), sizes.tolist(), n,
                                         self._attrs, [0], 1, handle)  # fmt: skip
        if err == rt.cudaError_t.cudaSuccess:
            self._batch = True
            return True
        unsupported = err in (rt.cudaError_t.cudaErrorNotSupported,
                              rt.cudaError_t.cudaErrorCallRequiresNewerDriver)  # fmt: skip
        if method == "auto" and unsupported and self._batch is None:
            with self._lock:
                self._batch = False
            log.warning("aiopinned: cudaMemcpyBatchAsync is not available (%s); one "
                        "cudaMemcpyAsync per piece from now on", error_text(err))  # fmt: skip
            return False
        raise CudaError(f"cudaMemcpyBatchAsync({n} copies) failed: {error_text(err)}")
