"""The backends' own contracts: HostStream, host memory, CUDA stream arguments, auto choice."""

from __future__ import annotations

import threading
import types

import pytest

from aiopinned import CudaError, HostStream, PinnedMemoryError, PinnedPool
from aiopinned.backends._cudart import cuda_unusable_reason, stream_handle
from aiopinned.backends.host import HostBackend


def test_host_stream_runs_callables_in_launch_order_on_its_own_thread() -> None:
    stream, seen, threads = HostStream(), [], set()
    for i in range(100):
        stream.launch(lambda i=i: (seen.append(i), threads.add(threading.get_ident())))
    stream.synchronize()
    assert seen == list(range(100))
    assert threads and threading.get_ident() not in threads


def test_host_stream_rejects_non_callables_and_reports_errors_at_synchronize() -> None:
    stream = HostStream()
    with pytest.raises(TypeError):
        stream.launch(42)  # type: ignore[arg-type]
    stream.launch(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        stream.synchronize()
    stream.synchronize()  # reported once


def test_host_events_complete_after_everything_launched_before() -> None:
    backend, stream, gate = HostBackend(), HostStream(), threading.Event()
    stream.launch(gate.wait)
    event = backend.record(backend.normalize_stream(stream))
    assert not backend.query(event)
    gate.set()
    backend.synchronize(event)
    assert backend.query(event)


def test_host_memory_is_page_aligned_and_writable() -> None:
    import ctypes
    import mmap

    backend = HostBackend()
    ptr = backend.alloc(10)
    assert ptr % mmap.PAGESIZE == 0
    ctypes.memset(ptr, 7, 10)
    assert ctypes.string_at(ptr, 10) == b"\x07" * 10
    backend.free(ptr, 10)
    with pytest.raises(PinnedMemoryError):
        backend.alloc(1 << 62)


def test_host_backend_takes_host_streams_or_none() -> None:
    backend = HostBackend()
    assert backend.normalize_stream(None) is backend.default_stream
    with pytest.raises(TypeError):
        backend.normalize_stream(0)


class _Protocol:
    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, 0xABC)


class _TorchLike:
    cuda_stream = 0xDEF


def _cupy_like() -> object:
    cls = types.new_class("Stream")
    cls.__module__ = "cupy.cuda.stream"
    obj = cls()
    obj.ptr = 0x123  # type: ignore[attr-defined]
    return obj


@pytest.mark.parametrize(
    ("stream", "handle"),
    [(None, 0), (0, 0), (7, 7), (_Protocol(), 0xABC), (_TorchLike(), 0xDEF), (_cupy_like(), 0x123)],
    ids=["none", "zero", "int", "__cuda_stream__", "torch", "cupy"],
)
def test_cuda_stream_arguments_normalize_to_handles(stream: object, handle: int) -> None:
    assert stream_handle(stream) == handle


@pytest.mark.parametrize("bad", [True, "0", 1.0, object()])
def test_other_cuda_stream_arguments_are_type_errors(bad: object) -> None:
    with pytest.raises(TypeError):
        stream_handle(bad)


def test_negative_cuda_stream_handles_are_value_errors() -> None:
    with pytest.raises(ValueError):
        stream_handle(-1)


@pytest.mark.anyio
async def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    reason = cuda_unusable_reason()
    if reason is None:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(CudaError, match="not usable"):
        async with PinnedPool("cuda"):
            pass


def test_host_stream_drops_its_work_once_run() -> None:
    import gc
    import weakref

    class Payload:
        pass

    stream, payload, ran = HostStream(), Payload(), threading.Event()
    ref = weakref.ref(payload)
    stream.launch(lambda p: ran.set(), payload)  # the last work launched: nothing runs after it
    ran.wait()
    del payload
    for _ in range(1000):
        gc.collect()
        if ref() is None:
            break
        ran.wait(0.001)
    assert ref() is None


# -- mapping and pinning --------------------------------------------------------------------------
def test_mapped_memory_is_faulted_in_over_threads_and_reads_as_zeros(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes
    import threading

    from aiopinned.backends import _memory

    monkeypatch.setattr(_memory, "PARALLEL_TOUCH_BYTES", 0)  # even this small block in threads
    writers: set[str] = set()
    real = ctypes.memset

    def spy(p: int, v: int, n: int) -> object:
        writers.add(threading.current_thread().name)
        return real(p, v, n)

    monkeypatch.setattr(_memory.ctypes, "memset", spy)
    mapped = _memory.Mapped(5 * _memory.HUGE_PAGE + 4096, threads=3)
    try:
        assert _memory.not_resident(mapped.ptr, mapped.size) == []
        assert ctypes.string_at(mapped.ptr, mapped.size) == bytes(mapped.size)
        assert writers == {"aiopinned-touch"}  # never the caller's thread
    finally:
        mapped.close()


def test_pages_the_kernel_gives_small_are_written_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where huge pages were advised but small ones came (THP off, fragmented memory), one byte
    per huge page leaves gaps; mincore finds them and they are written in full."""
    import ctypes
    import mmap

    from aiopinned.backends import _memory

    size = 4 * _memory.HUGE_PAGE + 8192
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_NOHUGEPAGE)  # small pages, whatever the system's THP mode
    anchor = ctypes.c_char.from_buffer(area)
    ptr = ctypes.addressof(anchor)
    del anchor
    try:
        assert _memory.not_resident(ptr, size) == [(ptr, size)]
        lengths: list[int] = []
        real = ctypes.memset
        monkeypatch.setattr(
            _memory.ctypes, "memset", lambda p, v, n: (lengths.append(n), real(p, v, n))
        )
        _memory.fault_in(ptr, size, threads=2, huge=True)
        assert _memory.not_resident(ptr, size) == []
        ones = [n for n in lengths if n == 1]
        assert 5 <= len(ones) <= 6  # the first byte, then one per huge-page boundary
        assert sum(lengths) - len(ones) >= size - len(ones) * mmap.PAGESIZE  # the gaps, in full
    finally:
        area.close()


def test_not_resident_reports_the_runs_without_pages() -> None:
    import ctypes
    import mmap

    from aiopinned.backends._memory import not_resident

    page = mmap.PAGESIZE
    area = mmap.mmap(-1, 8 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_NOHUGEPAGE)
    anchor = ctypes.c_char.from_buffer(area)
    ptr = ctypes.addressof(anchor)
    del anchor
    try:
        area[3 * page] = 1
        area[7 * page] = 1
        assert not_resident(ptr, 8 * page) == [(ptr, 3 * page), (ptr + 4 * page, 3 * page)]
    finally:
        area.close()


def test_a_mapping_the_system_refuses_is_a_pinned_memory_error() -> None:
    from aiopinned.backends._memory import Mapped

    with pytest.raises(PinnedMemoryError, match="could not map"):
        Mapped(1 << 62, threads=1)


def test_pinning_options_are_checked() -> None:
    with pytest.raises(ValueError, match="pinning"):
        PinnedPool("host", pinning="mlock")
    with pytest.raises(ValueError, match="pin_threads"):
        PinnedPool("host", pin_threads=0)
    with pytest.raises(TypeError):
        PinnedPool("host", pin_threads=1.5)  # type: ignore[arg-type]


class _FakeRuntime:
    """Just enough of cuda.bindings' runtime and driver for CudaBackend's construction and
    memory paths: ``devices`` devices, a current context per thread (``device + 1``; 0: none),
    and each memory call with the device whose context was current for it (-1: none)."""

    class cudaError_t:
        cudaSuccess, cudaErrorMemoryAllocation, cudaErrorInsufficientDriver = 0, 2, 35
        cudaErrorNotReady = 600

    class cudaMemcpyKind:
        cudaMemcpyDefault = 4

    class CUresult:
        CUDA_SUCCESS = 0

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeGlobal, cudaStreamCaptureModeRelaxed = 0, 2

    cudaHostRegisterPortable = cudaHostAllocPortable = cudaEventDisableTiming = 1

    def __init__(self, devices: int = 1, refuse_registration: bool = False) -> None:
        self.devices, self.refuse = devices, refuse_registration
        self.allocs: list[int] = []
        self.calls: list[tuple[str, int]] = []
        self.modes: list[int] = []  # each call's thread's stream-capture mode
        self._thread = threading.local()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from aiopinned.backends import _cudart, cuda

        for module in (cuda, _cudart):
            monkeypatch.setattr(module, "rt", self)
            monkeypatch.setattr(module, "drv", self)

    def context(self) -> int:
        return getattr(self._thread, "ctx", 0)

    def mode(self) -> int:
        return getattr(self._thread, "mode", self.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)

    def cudaThreadExchangeStreamCaptureMode(self, mode: int) -> tuple[int, int]:
        previous, self._thread.mode = self.mode(), mode
        return 0, previous

    def current(self) -> int:
        return self.context() - 1

    def cuCtxGetCurrent(self) -> tuple[int, int]:
        return 0, self.context()

    def cuCtxGetDevice(self) -> tuple[int, int]:
        return 0, self.current()

    def cuCtxSetCurrent(self, ctx: int) -> tuple[int]:
        self._thread.ctx = ctx
        return (0,)

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"out of memory"

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return 0, self.devices

    def cudaSetDevice(self, device: int) -> tuple[int]:
        self._thread.ctx = device + 1
        return (0,)

    def cudaDeviceGetPCIBusId(self, n: int, device: int) -> tuple[int, bytes]:
        return 0, f"0000:0{device}:00.0".encode() + b"\0 padding"

    def cudaFree(self, ptr: int) -> tuple[int]:
        self.calls.append(("cudaFree", self.current()))
        return (0,)

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> tuple[int]:
        self.calls.append(("cudaHostRegister", self.current()))
        self.modes.append(self.mode())
        return (self.cudaError_t.cudaErrorMemoryAllocation if self.refuse else 0,)

    def cudaHostUnregister(self, ptr: int) -> tuple[int]:
        self.calls.append(("cudaHostUnregister", self.current()))
        self.modes.append(self.mode())
        return (0,)

    def _call(self, name: str, *result: object) -> tuple[object, ...]:
        self.calls.append((name, self.current()))
        self.modes.append(self.mode())
        return (0, *result)

    def cudaEventCreateWithFlags(self, flags: int) -> tuple[object, ...]:
        return self._call("cudaEventCreateWithFlags", 0xE0 + self.current())

    def cudaEventRecord(self, event: int, stream: int) -> tuple[object, ...]:
        return self._call("cudaEventRecord")

    def cudaEventQuery(self, event: int) -> tuple[object, ...]:
        return self._call("cudaEventQuery")

    def cudaEventSynchronize(self, event: int) -> tuple[object, ...]:
        return self._call("cudaEventSynchronize")

    def cudaEventDestroy(self, event: int) -> tuple[object, ...]:
        return self._call("cudaEventDestroy")

    def cudaStreamSynchronize(self, stream: int) -> tuple[object, ...]:
        return self._call("cudaStreamSynchronize")

    def cudaStreamGetDevice(self, stream: int) -> tuple[object, ...]:
        return self._call("cudaStreamGetDevice", 1)

    def cudaMemcpy(self, dst: int, src: int, n: int, kind: int) -> tuple[object, ...]:
        return self._call("cudaMemcpy")

    def cudaHostAlloc(self, size: int, flags: int) -> tuple[int, int]:
        self.allocs.append(size)
        return 0, 0x7000_0000 + len(self.allocs) * 0x10000


@pytest.mark.parametrize("mode", ["auto", "register"])
def test_refused_registration_falls_back_once_or_names_its_cause(
    mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aiopinned.backends import cuda

    fake = _FakeRuntime(refuse_registration=True)
    fake.install(monkeypatch)
    backend = cuda.CudaBackend(mode, threads=1)
    if mode == "register":
        with pytest.raises(PinnedMemoryError, match="RLIMIT_MEMLOCK"):
            backend.alloc(4096)
        return
    caplog.set_level("WARNING", logger="aiopinned")
    assert backend.alloc(4096) and backend.alloc(8192)
    assert fake.allocs == [4096, 8192] and backend.pinning == "alloc"
    assert caplog.text.count("pinning by registration failed") == 1


def test_every_call_that_may_break_a_capture_runs_in_the_relaxed_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A graph that someone captures in the global mode (torch.cuda.graph's default) is made
    invalid by an unsafe call from any thread: the pool's pins, unpins, event calls and copies
    run in the relaxed mode, and leave the thread's own mode as it was."""
    from aiopinned.backends import cuda

    fake = _FakeRuntime()
    fake.install(monkeypatch)
    backend = cuda.CudaBackend("register", threads=1)
    fake.modes.clear()
    backend.free(backend.alloc(4096), 4096)
    event = backend.record((0, 7))
    backend.query(event)
    backend.synchronize(event)
    backend.synchronize_stream((0, 7))
    backend.copy(0x1000, 0x2000, 16)
    backend.release_event(event)
    backend.close()  # (destroys the cached event)
    relaxed = fake.cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed
    assert len(fake.modes) == 9 and set(fake.modes) == {relaxed}, fake.modes
    assert fake.mode() == fake.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal


def test_a_cuda_backend_pins_and_unpins_on_its_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two devices: every memory call runs with the backend's device current (no context is
    made on another), the calling thread's context is left as it was (here: none, which
    ``cudaSetDevice(0)`` would have created), and ``"auto"`` asks for the node of that device's
    PCI address (the driver's padding after the NUL cut off)."""
    from aiopinned.backends import cuda

    fake = _FakeRuntime(devices=2)
    asked: list[str | None] = []
    fake.install(monkeypatch)
    monkeypatch.setattr(cuda, "resolve", lambda node, bus, where: asked.append(bus))
    backend = cuda.CudaBackend("register", threads=1, numa_node="auto", device=1)
    ptr = backend.alloc(4096)
    backend.free(ptr, 4096)
    assert fake.calls == [("cudaFree", 1), ("cudaHostRegister", 1), ("cudaHostUnregister", 1)]
    assert fake.context() == 0 and backend.device == 1 and asked == ["0000:01:00.0"]
    fake.cudaSetDevice(1)  # a caller already on the device: nothing switches
    backend.free(backend.alloc(4096), 4096)
    assert fake.context() == 2
    assert fake.calls[-2:] == [("cudaHostRegister", 1), ("cudaHostUnregister", 1)]
    assert cuda.CudaBackend("register", threads=1).device == 0  # none given: device 0
    with pytest.raises(ValueError, match="sees 2 CUDA device"):
        cuda.CudaBackend(device=2)


def test_the_device_argument_is_checked_at_once() -> None:
    with pytest.raises(ValueError, match="device"):
        PinnedPool("host", device=-1)
    for bad in (1.0, True, "cuda:1"):
        with pytest.raises(TypeError, match="device"):
            PinnedPool("host", device=bad)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_pool_given_no_device_serves_the_one_current_on_its_loop_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The device of the loop thread's CUDA context is read on the loop thread (the driver is
    loaded off it first), and the backend is made for that device."""
    from aiopinned import _runtime

    read_on: list[int] = []
    made: list[object] = []

    def reader() -> int:
        read_on.append(threading.get_ident())
        return 1

    def make(spec: object, *args: object) -> HostBackend:
        made.append(args[-1])
        backend = HostBackend(1)
        backend.device = args[-1]  # type: ignore[attr-defined]
        return backend

    monkeypatch.setattr(_runtime, "device_reader", lambda spec: reader)
    monkeypatch.setattr(_runtime, "make_backend", make)
    async with PinnedPool("cuda") as pool:
        assert read_on == [threading.get_ident()] and made == [1] and pool.device == 1
    async with PinnedPool("cuda", device=0) as pool:  # given: nothing is read
        assert len(read_on) == 1 and made == [1, 0] and pool.device == 0
    monkeypatch.undo()
    pool = PinnedPool("host", device=3)
    assert pool.device == 3  # what was asked, until it opens
    async with pool:
        assert pool.device is None  # the host backend has no device


def test_no_device_is_read_where_the_pool_will_not_use_cuda() -> None:
    from aiopinned.backends import device_reader

    assert device_reader("host") is None and device_reader(HostBackend(1)) is None
    if cuda_unusable_reason() is not None:
        assert device_reader("auto") is None and device_reader("cuda") is None


def test_event_calls_from_a_thread_with_no_context_make_none_on_device_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two devices, a pool for device 1, a thread with no context (the watcher's, the reaper):
    the calls that would make a context there (an event's record and destruction, a copy) run
    under device 1's, and the thread is left with none; those that make none (a stream's device,
    an event's query and wait: measured on the H200 host) switch nothing.  Where a thread has a
    context already, a destruction or a copy uses it, and a record still goes to the stream's
    device."""
    from aiopinned.backends import cuda

    fake = _FakeRuntime(devices=2)
    fake.install(monkeypatch)
    backend = cuda.CudaBackend("register", threads=1, device=1)
    fake.calls.clear()
    stream = backend.normalize_stream(0x5000)  # a stream of device 1 (the fake says)
    event = backend.record(stream)
    assert backend.query(event)
    backend.synchronize(event)
    backend.copy(0x1000, 0x2000, 64)
    backend.release_event(event)
    backend.close()  # destroys the cached event
    assert fake.calls == [
        ("cudaStreamGetDevice", -1), ("cudaEventCreateWithFlags", 1), ("cudaEventRecord", 1),
        ("cudaEventQuery", -1), ("cudaEventSynchronize", -1), ("cudaMemcpy", 1),
        ("cudaEventDestroy", 1),
    ]  # fmt: skip
    assert fake.context() == 0  # none made, none left behind
    fake.cudaSetDevice(0)  # a thread already on device 0's context
    backend = cuda.CudaBackend("register", threads=1, device=1)
    fake.calls.clear()
    event = backend.record((1, 0x5000))
    backend.copy(0x1000, 0x2000, 64)
    backend.release_event(event)
    backend.close()
    assert [d for _, d in fake.calls] == [1, 1, 0, 0] and fake.context() == 1
