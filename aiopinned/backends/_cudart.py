"""The cuda-bindings calls the CUDA backend and ``info`` share: the import, error checking,
contexts and devices, and stream handles.  Only the backends and ``info`` import it: the pool
never imports CUDA.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from typing import Any

from ..errors import CudaError, PinnedMemoryError

__all__ = [
    "check",
    "context_device",
    "cuda_unusable_reason",
    "current_context",
    "drv",
    "error_text",
    "pci_bus_id",
    "relaxed_capture",
    "rt",
    "stream_handle",
]

try:
    from cuda.bindings import driver as drv
    from cuda.bindings import runtime as rt
except ImportError as _exc:  # pragma: no cover - cuda-bindings is a required dependency
    rt = drv = None
    _IMPORT_ERROR: Exception | None = _exc
else:
    _IMPORT_ERROR = None


def error_text(err: Any) -> str:
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


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-bindings result tuple, raising on any error code."""
    if isinstance(result, tuple):
        err, *values = result
    else:
        err, values = result, []
    if err != rt.cudaError_t.cudaSuccess:
        if err == rt.cudaError_t.cudaErrorMemoryAllocation:
            raise PinnedMemoryError(f"{call} failed: {error_text(err)}")
        raise CudaError(f"{call} failed: {error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_unusable_reason() -> str | None:
    """``None`` when a CUDA device is usable, else why not (for the auto backend's log line)."""
    if rt is None:
        return f"cuda-bindings is not importable: {_IMPORT_ERROR}"
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return error_text(err)
    if count == 0:
        return "no CUDA device"
    return None


def stream_handle(stream: Any) -> int:
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


def context_device() -> int | None:
    """The device of the CUDA context current in the calling thread (``torch.cuda.set_device``,
    CuPy's ``Device.use()``, ``cudaSetDevice``), or ``None`` where there is none.  It never
    initializes CUDA: a few µs, once the driver's library is loaded (the first call loads it)."""
    try:
        return current_context()[1]
    except Exception:  # no driver library (cuda-bindings raises its own loader errors), no init
        return None


def current_context() -> tuple[Any, int | None]:
    """The calling thread's current context (a null handle where none) and its device."""
    err, ctx = drv.cuCtxGetCurrent()
    if err != drv.CUresult.CUDA_SUCCESS:
        raise CudaError(f"cuCtxGetCurrent failed: {getattr(err, 'name', err)}")
    if not int(ctx):
        return ctx, None
    err, device = drv.cuCtxGetDevice()
    if err != drv.CUresult.CUDA_SUCCESS:
        raise CudaError(f"cuCtxGetDevice failed: {getattr(err, 'name', err)}")
    return ctx, int(device)


def pci_bus_id(device: int) -> str:
    """The PCI address of a device (``0000:3b:00.0``)."""
    bus = check(rt.cudaDeviceGetPCIBusId(32, device), f"cudaDeviceGetPCIBusId({device})")
    text = bus.decode(errors="replace") if isinstance(bus, (bytes, bytearray)) else str(bus)
    return text.split("\0")[0].strip()  # the driver pads the buffer after the NUL


@contextlib.contextmanager
def relaxed_capture() -> Iterator[None]:
    """The calling thread in the relaxed stream-capture mode for a while: a call that may be
    unsafe during a capture (an event query or wait, host registration, ``cudaHostAlloc``) then
    leaves a graph that another thread (or this one) is capturing in the global mode valid.
    The thread's own mode is restored after."""
    exchange, call = rt.cudaThreadExchangeStreamCaptureMode, "cudaThreadExchangeStreamCaptureMode"
    previous = check(exchange(rt.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed), call)
    try:
        yield
    finally:
        check(exchange(previous), call)


def register_chunk(ptr: int, size: int) -> None:
    """``cudaHostRegister`` one chunk of a mapping (portable: any device copies from it)."""
    (err,) = rt.cudaHostRegister(ptr, size, rt.cudaHostRegisterPortable)
    if err != rt.cudaError_t.cudaSuccess:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        raise PinnedMemoryError(
            f"cudaHostRegister({size}) failed: {error_text(err)}; page-locked memory is "
            f"limited by RLIMIT_MEMLOCK (now {limit}: raise 'ulimit -l'), or pass "
            "pinning='alloc'"
        )


def unregister_chunk(ptr: int) -> None:
    check(rt.cudaHostUnregister(ptr), f"cudaHostUnregister({ptr:#x})")
