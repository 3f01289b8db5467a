"""The CUDA backend: ``cuda.bindings.runtime`` (the cuda-python project's runtime bindings).

* Memory, by ``pinning``: ``"register"`` maps anonymous memory, advises huge pages, touches its
  pages from several threads and ``cudaHostRegister``s it (``cudaHostUnregister`` + ``munmap`` to
  release): about 10x faster than ``cudaHostAlloc``, which faults every page in one thread.
  ``"alloc"`` is the seed's ``cudaHostAlloc(..., Portable)`` / ``cudaFreeHost``.  ``"auto"`` (the
  default) registers, and where registration fails, falls back to ``cudaHostAlloc`` for good,
  once, with a log line saying why.
* A backend serves one ``device`` (default: the device of the opening thread's CUDA context, else
  0): pinning and unpinning run with that device current, so that no other device's context is
  made or used, and ``numa_node="auto"`` is that device's node.  The memory is ``Portable``: any
  device can copy from it.
* Events: ``cudaEventDisableTiming``, created on the device of the stream they are recorded on
  and reused from a per-device free list.
* CUDA graphs: a stream that is capturing is reported (``capture_of``), and memory is held for
  the graph's lifetime (``hold_for_graph``, ``_graphhold.py``).  Every call the pool makes that
  may be unsafe during a capture runs in the relaxed capture mode (``relaxed_capture``), so a
  graph that a user captures in the global mode meanwhile (``torch.cuda.graph``'s default) stays
  valid whatever the pool's threads do.
* Every CUDA return code is checked; failures raise :class:`~aiopinned.CudaError` (or
  :class:`~aiopinned.PinnedMemoryError` when pinning runs out of memory), naming the call.

Streams arrive as raw ``int`` handles, objects with ``__cuda_stream__()`` (torch ≥ 2.10, CuPy,
cuda.core), ``torch.cuda.Stream`` (``.cuda_stream``), CuPy streams (``.ptr``), or cuda-python's
``cudaStream_t``/``CUstream``; ``None`` is the legacy default stream.  A stream's key is
``(device, handle)``: the legacy default stream of each device is a different stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from ..errors import CudaError, PinnedMemoryError
from ._cudart import (
    check,
    cuda_unusable_reason,
    current_context,
    drv,
    error_text,
    pci_bus_id,
    register_chunk,
    relaxed_capture,
    rt,
    stream_handle,
    unregister_chunk,
)
from ._graphhold import GraphHolds
from ._hugepages import HUGETLB, HugePages
from ._memory import REGISTER_CHUNK_BYTES, Mapped, check_pinning, default_threads
from ._numa import resolve

__all__ = ["CudaBackend"]

log = logging.getLogger("aiopinned")

_LEGACY_HANDLES = (0, 1, 2)  # 0 and cudaStreamLegacy: legacy default; 2: per-thread default


def _numa_node(numa_node: int | str | None, device: int) -> int | None:
    if numa_node != "auto":
        return resolve(numa_node, None, "cuda")
    try:
        bus_id: str | None = pci_bus_id(device)
    except CudaError as exc:
        log.warning("aiopinned: no PCI address for cuda:%d (%s)", device, exc)
        bus_id = None
    return resolve(numa_node, bus_id, f"cuda:{device} ({bus_id})")


class _Event:
    __slots__ = ("device", "handle")

    def __init__(self, device: int, handle: Any) -> None:
        self.device = device
        self.handle = handle


class CudaBackend:
    """Pinned memory and events through ``cuda.bindings.runtime``."""

    name = "cuda"

    def __init__(
        self,
        pinning: str = "auto",
        threads: int | None = None,
        numa_node: int | str | None = None,
        device: int | None = None,
    ) -> None:
        self.pinning = check_pinning(pinning)
        self.huge_pages = HugePages()
        #: the most one ``cudaHostRegister`` covers (``REGISTER_CHUNK_BYTES``)
        self.register_chunk_bytes = REGISTER_CHUNK_BYTES
        self._threads = default_threads() if threads is None else threads
        self._registered: dict[int, Mapped] = {}
        reason = cuda_unusable_reason()
        if reason is not None:
            raise CudaError(f"the cuda backend is not usable: {reason}")
        self._ndev = int(check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))
        if device is not None and device >= self._ndev:
            raise ValueError(f"device={device}: this process sees {self._ndev} CUDA device(s)")
        #: the device this backend pins for: its context pins and unpins, its node holds blocks
        self.device = 0 if device is None else device
        self._events: dict[int, list[_Event]] = {}
        self._closed = False
        self._lock = threading.Lock()  # the event lists are touched from the loop and the closer
        self._graphs = GraphHolds()
        with self._on_device(self.device):
            check(rt.cudaFree(0), "cudaFree(0)")  # the device's primary context, off the loop
        #: the NUMA node new blocks are placed on (None: the kernel's choice)
        self.numa_node = _numa_node(numa_node, self.device)

    # -- memory -------------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        with relaxed_capture(), self._on_device(self.device):  # (not another device's context)
            return self._alloc(size)

    def _alloc(self, size: int) -> int:
        if self.pinning != "alloc":
            try:
                return self._register(size)
            except PinnedMemoryError as exc:
                if self.pinning == "register" or self.pinning in HUGETLB:
                    raise
                with self._lock:
                    first, self.pinning = self.pinning == "auto", "alloc"
                if first:
                    log.warning("aiopinned: pinning by registration failed (%s); pinning with "
                                "cudaHostAlloc from now on", exc)  # fmt: skip
        ptr = check(rt.cudaHostAlloc(size, rt.cudaHostAllocPortable), f"cudaHostAlloc({size})")
        return int(ptr)

    def _register(self, size: int) -> int:
        mapped = Mapped.registered(size, self._threads, self.numa_node, self.huge_pages,
                                   self.pinning, register_chunk, unregister_chunk,
                                   self.register_chunk_bytes)  # fmt: skip
        with self._lock:
            self._registered[mapped.ptr] = mapped
        return mapped.ptr

    def free(self, ptr: int, size: int) -> None:
        with self._lock:
            mapped = self._registered.get(ptr)
        with relaxed_capture(), self._on_device(self.device):
            if mapped is None:
                check(rt.cudaFreeHost(ptr), f"cudaFreeHost({ptr:#x}, {size} bytes)")
                return
            mapped.unregister(unregister_chunk)  # (a failure leaves it mapped, and counted)
        with self._lock:
            del self._registered[ptr]
        mapped.close()

    def copy(self, dst: int, src: int, count: int) -> None:
        with relaxed_capture(), self._on_device(self.device, any_context=True):
            check(
                rt.cudaMemcpy(dst, src, count, rt.cudaMemcpyKind.cudaMemcpyDefault),
                f"cudaMemcpy({count})",
            )

    def prepare_torch(self) -> None:
        import torch

        # torch only reports memory from cudaHostAlloc as pinned once it has initialized CUDA.
        torch.cuda.init()

    # -- streams and events -------------------------------------------------------------------
    def normalize_stream(self, stream: object) -> tuple[int, int]:
        handle = stream_handle(stream)
        if self._ndev == 1:
            return (0, handle)
        if handle in _LEGACY_HANDLES:
            device = check(rt.cudaGetDevice(), "cudaGetDevice")
        else:
            device = check(rt.cudaStreamGetDevice(handle), f"cudaStreamGetDevice({handle:#x})")
        return (int(device), handle)

    def record(self, stream: tuple[int, int]) -> _Event:
        device, handle = stream
        with self._lock:
            free = self._events.get(device)
            event = free.pop() if free else None
        previous = self._enter_device(device)
        try:
            with relaxed_capture():
                if event is None:
                    flags = rt.cudaEventDisableTiming
                    h = check(rt.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")
                    event = _Event(device, h)
                call = f"cudaEventRecord(stream={handle:#x})"
                check(rt.cudaEventRecord(event.handle, handle), call)
        except BaseException:
            if event is not None:
                self.release_event(event)
            raise
        finally:
            self._leave_device(previous)
        return event

    def query(self, event: _Event) -> bool:
        with relaxed_capture():
            err = rt.cudaEventQuery(event.handle)[0]
        if err == rt.cudaError_t.cudaSuccess:
            return True
        if err == rt.cudaError_t.cudaErrorNotReady:
            return False
        raise CudaError(f"cudaEventQuery failed: {error_text(err)}")

    def synchronize(self, event: _Event) -> None:
        with relaxed_capture():
            check(rt.cudaEventSynchronize(event.handle), "cudaEventSynchronize")

    def synchronize_stream(self, stream: tuple[int, int]) -> None:
        device, handle = stream
        previous = self._enter_device(device)
        try:
            with relaxed_capture():
                check(rt.cudaStreamSynchronize(handle), f"cudaStreamSynchronize({handle:#x})")
        finally:
            self._leave_device(previous)

    def capture_of(self, stream: tuple[int, int]) -> tuple[int, Any] | None:
        """The capture sequence (its id, its graph) that ``stream`` is in, or ``None``."""
        handle = stream[1]
        if handle in _LEGACY_HANDLES[:2]:  # (the legacy default stream never captures)
            return None
        err, status, capture_id, graph, *_ = rt.cudaStreamGetCaptureInfo(handle)
        check(err, f"cudaStreamGetCaptureInfo({handle:#x})")
        if status == rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusNone:
            return None
        if status != rt.cudaStreamCaptureStatus.cudaStreamCaptureStatusActive:
            raise CudaError(
                f"stream {handle:#x}'s graph capture was invalidated: end the capture "
                "(cudaStreamEndCapture) before using pool memory on it"
            )
        return int(capture_id), graph

    def hold_for_graph(self, capture: tuple[int, Any], release: Any) -> None:
        self._graphs.hold(*capture, release)

    def release_event(self, event: _Event) -> None:
        with self._lock:
            if not self._closed:
                self._events.setdefault(event.device, []).append(event)
                return
        self._destroy(event)

    def _destroy(self, event: _Event) -> None:
        with relaxed_capture(), self._on_device(event.device, any_context=True):
            check(rt.cudaEventDestroy(event.handle), "cudaEventDestroy")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            events = [e for lst in self._events.values() for e in lst]
            self._events.clear()
        for event in events:
            self._destroy(event)

    @contextlib.contextmanager
    def _on_device(self, device: int, *, any_context: bool = False) -> Iterator[None]:
        """``_enter_device`` for a while (the calls off the hit path)."""
        previous = self._enter_device(device, any_context=any_context)
        try:
            yield
        finally:
            self._leave_device(previous)

    def _enter_device(self, device: int, *, any_context: bool = False) -> Any:
        """Make ``device``'s primary context current in this thread; what to restore (``None``:
        nothing changed).  The thread's own context is restored as it was, none included:
        ``cudaSetDevice(previous)`` would create the previous device's context (CUDA >= 12).

        ``any_context``: for calls that work from any device's context but, from a thread with
        none, make the thread's device's (device 0's, on a host where this process may never use
        device 0): there only a thread with no context switches.  On the H200 host (CUDA 13),
        ``cudaEventDestroy``, ``cudaMemcpy`` and ``cudaHostRegister``/``Unregister`` made a
        context current in a fresh thread; ``cudaEventQuery``, ``cudaEventSynchronize``,
        ``cudaStreamGetDevice`` and ``cudaGetDevice`` did not, so they switch nothing."""
        if self._ndev == 1:
            return None
        ctx, current = current_context()
        if current == device or (any_context and current is not None):
            return None
        check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        return ctx

    def _leave_device(self, previous: Any) -> None:
        if previous is not None:
            (err,) = drv.cuCtxSetCurrent(previous)
            if err != drv.CUresult.CUDA_SUCCESS:
                raise CudaError(f"cuCtxSetCurrent failed: {getattr(err, 'name', err)}")
