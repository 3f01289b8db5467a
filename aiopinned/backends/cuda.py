"""The CUDA backend: ``cuda.bindings.runtime`` (the cuda-python project's runtime bindings).

* Memory, by ``pinning``: ``"register"`` maps anonymous memory, advises huge pages, touches its
  pages from several threads and ``cudaHostRegister``s it (``cudaHostUnregister`` + ``munmap`` to
  release): about 10x faster than ``cudaHostAlloc``, which faults every page in one thread.
  ``"alloc"`` is the seed's ``cudaHostAlloc(..., Portable)`` / ``cudaFreeHost``.  ``"auto"`` (the
  default) registers, and where registration fails, falls back to ``cudaHostAlloc`` for good,
  once, with a log line saying why.
* Events: ``cudaEventDisableTiming``, created on the device of the stream they are recorded on
  and reused from a per-device free list.
* Every CUDA return code is checked; failures raise :class:`~aiopinned.CudaError` (or
  :class:`~aiopinned.PinnedMemoryError` when pinning runs out of memory), naming the call.

Streams arrive as raw ``int`` handles, objects with ``__cuda_stream__()`` (torch ≥ 2.10, CuPy,
cuda.core), ``torch.cuda.Stream`` (``.cuda_stream``), CuPy streams (``.ptr``), or cuda-python's
``cudaStream_t``/``CUstream``; ``None`` is the legacy default stream.  A stream's key is
``(device, handle)``: the legacy default stream of each device is a different stream.
"""

from __future__ import annotations

import logging
import resource
import threading
from typing import Any

from ..errors import CudaError, PinnedMemoryError
from ._memory import PINNING_MODES, Mapped, default_threads
from ._numa import resolve

__all__ = ["CudaBackend", "cuda_unusable_reason"]

log = logging.getLogger("aiopinned")

try:  # imported here only: the pool never imports CUDA
    from cuda.bindings import runtime as rt
except ImportError as _exc:  # pragma: no cover - cuda-bindings is a required dependency
    rt = None
    _IMPORT_ERROR: Exception | None = _exc
else:
    _IMPORT_ERROR = None

_LEGACY_HANDLES = (0, 1, 2)  # 0 and cudaStreamLegacy: legacy default; 2: per-thread default


def _error_text(err: Any) -> str:
    name = getattr(err, "name", str(err))
    _, text = rt.cudaGetErrorString(err)
    desc = text.decode() if isinstance(text, bytes) else str(text)
    hint = ""
    if err == rt.cudaError_t.cudaErrorInsufficientDriver:
        hint = (
            " (no NVIDIA driver, or one older than the installed cuda-bindings; "
            "on a CUDA 12 driver install 'aiopinned[cu12]')"
        )
    return f"{name} ({int(err)}): {desc}{hint}"


def _check(result: Any, call: str) -> Any:
    """Unpack a cuda-bindings result tuple, raising on any error code."""
    if isinstance(result, tuple):
        err, *values = result
    else:
        err, values = result, []
    if err != rt.cudaError_t.cudaSuccess:
        if err == rt.cudaError_t.cudaErrorMemoryAllocation:
            raise PinnedMemoryError(f"{call} failed: {_error_text(err)}")
        raise CudaError(f"{call} failed: {_error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_unusable_reason() -> str | None:
    """``None`` when a CUDA device is usable, else why not (for the auto backend's log line)."""
    if rt is None:
        return f"cuda-bindings is not importable: {_IMPORT_ERROR}"
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return _error_text(err)
    if count == 0:
        return "no CUDA device"
    return None


def _stream_handle(stream: Any) -> int:
    if stream is None:
        return 0
    if isinstance(stream, bool):
        raise TypeError("a stream cannot be a bool")
    if isinstance(stream, int):
        handle = stream
    elif hasattr(stream, "__cuda_stream__"):
        _version, handle = stream.__cuda_stream__()
    elif hasattr(stream, "cuda_stream"):  # torch.cuda.Stream before __cuda_stream__
        handle = stream.cuda_stream
    elif type(stream).__module__.startswith("cupy") and hasattr(stream, "ptr"):
        handle = stream.ptr
    elif type(stream).__name__ in ("cudaStream_t", "CUstream") and hasattr(stream, "getPtr"):
        handle = int(stream)  # cuda-python's own handle types
    else:
        raise TypeError(
            "a CUDA stream must be an int handle, an object with __cuda_stream__(), a "
            "torch.cuda.Stream, a CuPy stream, a cudaStream_t/CUstream or None, not "
            f"{type(stream).__name__}"
        )
    handle = int(handle)
    if handle < 0:
        raise ValueError(f"a CUDA stream handle cannot be negative ({handle})")
    return handle


def _current_device() -> tuple[str | None, str]:
    """The current device's PCI address (``None`` if the driver will not say), and its name."""
    device = int(_check(rt.cudaGetDevice(), "cudaGetDevice"))
    try:
        bus = _check(rt.cudaDeviceGetPCIBusId(32, device), "cudaDeviceGetPCIBusId")
    except CudaError as exc:
        log.warning("aiopinned: no PCI address for cuda:%d (%s)", device, exc)
        return None, f"cuda:{device}"
    text = bus.decode() if isinstance(bus, (bytes, bytearray)) else str(bus)
    bus_id = text.split("\0")[0].strip()
    return bus_id, f"cuda:{device} ({bus_id})"


class _Event:
    __slots__ = ("device", "handle")

    def __init__(self, device: int, handle: Any) -> None:
        self.device = device
        self.handle = handle


class CudaBackend:
    """Pinned memory and events through ``cuda.bindings.runtime``."""

    name = "cuda"

    def __init__(
        self, pinning: str = "auto", threads: int | None = None, numa_node: int | str | None = None
    ) -> None:
        if pinning not in PINNING_MODES:
            raise ValueError(f"pinning must be one of {PINNING_MODES}, not {pinning!r}")
        self.pinning = pinning
        self._threads = default_threads() if threads is None else threads
        self._registered: dict[int, Mapped] = {}
        reason = cuda_unusable_reason()
        if reason is not None:
            raise CudaError(f"the cuda backend is not usable: {reason}")
        self._ndev = int(_check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount"))
        _check(rt.cudaFree(0), "cudaFree(0)")  # create the primary context now, off the loop
        #: the NUMA node new blocks are placed on (None: the kernel's choice)
        where = _current_device() if numa_node == "auto" else (None, "cuda")
        self.numa_node = resolve(numa_node, *where)
        self._events: dict[int, list[_Event]] = {}
        self._closed = False
        self._lock = threading.Lock()  # the event lists are touched from the loop and the closer

    # -- memory -------------------------------------------------------------------------------
    def alloc(self, size: int) -> int:
        if self.pinning != "alloc":
            try:
                return self._register(size)
            except PinnedMemoryError as exc:
                if self.pinning == "register":
                    raise
                with self._lock:
                    first, self.pinning = self.pinning == "auto", "alloc"
                if first:
                    log.warning("aiopinned: pinning by registration failed (%s); pinning with "
                                "cudaHostAlloc from now on", exc)  # fmt: skip
        ptr = _check(rt.cudaHostAlloc(size, rt.cudaHostAllocPortable), f"cudaHostAlloc({size})")
        return int(ptr)

    def _register(self, size: int) -> int:
        mapped = Mapped(size, self._threads, self.numa_node)
        (err,) = rt.cudaHostRegister(mapped.ptr, size, rt.cudaHostRegisterPortable)
        if err != rt.cudaError_t.cudaSuccess:
            mapped.close()
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
            raise PinnedMemoryError(
                f"cudaHostRegister({size}) failed: {_error_text(err)}; page-locked memory is "
                f"limited by RLIMIT_MEMLOCK (now {limit}: raise 'ulimit -l'), or pass "
                "pinning='alloc'"
            )
        with self._lock:
            self._registered[mapped.ptr] = mapped
        return mapped.ptr

    def free(self, ptr: int, size: int) -> None:
        with self._lock:
            mapped = self._registered.get(ptr)
        if mapped is None:
            _check(rt.cudaFreeHost(ptr), f"cudaFreeHost({ptr:#x}, {size} bytes)")
            return
        _check(rt.cudaHostUnregister(ptr), f"cudaHostUnregister({ptr:#x}, {size} bytes)")
        with self._lock:
            del self._registered[ptr]
        mapped.close()

    def copy(self, dst: int, src: int, count: int) -> None:
        _check(
            rt.cudaMemcpy(dst, src, count, rt.cudaMemcpyKind.cudaMemcpyDefault),
            f"cudaMemcpy({count})",
        )

    def prepare_torch(self) -> None:
        import torch

        # torch only reports memory from cudaHostAlloc as pinned once it has initialized CUDA.
        torch.cuda.init()

    # -- streams and events -------------------------------------------------------------------
    def normalize_stream(self, stream: object) -> tuple[int, int]:
        handle = _stream_handle(stream)
        if self._ndev == 1:
            return (0, handle)
        if handle in _LEGACY_HANDLES:
            device = _check(rt.cudaGetDevice(), "cudaGetDevice")
        else:
            device = _check(rt.cudaStreamGetDevice(handle), f"cudaStreamGetDevice({handle:#x})")
        return (int(device), handle)

    def record(self, stream: tuple[int, int]) -> _Event:
        device, handle = stream
        with self._lock:
            free = self._events.get(device)
            event = free.pop() if free else None
        previous = self._enter_device(device)
        try:
            if event is None:
                h = _check(
                    rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming),
                    "cudaEventCreateWithFlags",
                )
                event = _Event(device, h)
            _check(rt.cudaEventRecord(event.handle, handle), f"cudaEventRecord(stream={handle:#x})")
        except BaseException:
            if event is not None:
                self.release_event(event)
            raise
        finally:
            self._leave_device(previous)
        return event

    def query(self, event: _Event) -> bool:
        err = rt.cudaEventQuery(event.handle)[0]
        if err == rt.cudaError_t.cudaSuccess:
            return True
        if err == rt.cudaError_t.cudaErrorNotReady:
            return False
        raise CudaError(f"cudaEventQuery failed: {_error_text(err)}")

    def synchronize(self, event: _Event) -> None:
        _check(rt.cudaEventSynchronize(event.handle), "cudaEventSynchronize")

    def synchronize_stream(self, stream: tuple[int, int]) -> None:
        device, handle = stream
        previous = self._enter_device(device)
        try:
            _check(rt.cudaStreamSynchronize(handle), f"cudaStreamSynchronize({handle:#x})")
        finally:
            self._leave_device(previous)

    def release_event(self, event: _Event) -> None:
        with self._lock:
            if not self._closed:
                self._events.setdefault(event.device, []).append(event)
                return
        _check(rt.cudaEventDestroy(event.handle), "cudaEventDestroy")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            events = [e for lst in self._events.values() for e in lst]
            self._events.clear()
        for event in events:
            _check(rt.cudaEventDestroy(event.handle), "cudaEventDestroy")

    def _enter_device(self, device: int) -> int | None:
        if self._ndev == 1:
            return None
        current = int(_check(rt.cudaGetDevice(), "cudaGetDevice"))
        if current == device:
            return None
        _check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
        return current

    def _leave_device(self, previous: int | None) -> None:
        if previous is not None:
            _check(rt.cudaSetDevice(previous), f"cudaSetDevice({previous})")
