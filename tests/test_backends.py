"""The backends' own contracts: HostStream, host memory, CUDA stream arguments, auto choice."""

from __future__ import annotations

import threading
import types

import pytest

from aiopinned import CudaError, HostStream, PinnedMemoryError, PinnedPool
from aiopinned.backends.cuda import _stream_handle, cuda_unusable_reason
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
    assert _stream_handle(stream) == handle


@pytest.mark.parametrize("bad", [True, "0", 1.0, object()])
def test_other_cuda_stream_arguments_are_type_errors(bad: object) -> None:
    with pytest.raises(TypeError):
        _stream_handle(bad)


def test_negative_cuda_stream_handles_are_value_errors() -> None:
    with pytest.raises(ValueError):
        _stream_handle(-1)


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
    """Just enough of cuda.bindings.runtime for CudaBackend's memory paths, with
    registration refused."""

    class cudaError_t:
        cudaSuccess, cudaErrorMemoryAllocation, cudaErrorInsufficientDriver = 0, 2, 35

    cudaHostRegisterPortable = cudaHostAllocPortable = 1

    def __init__(self) -> None:
        self.allocs: list[int] = []

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"out of memory"

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> tuple[int]:
        return (self.cudaError_t.cudaErrorMemoryAllocation,)

    def cudaHostAlloc(self, size: int, flags: int) -> tuple[int, int]:
        self.allocs.append(size)
        return 0, 0x7000_0000 + len(self.allocs) * 0x10000


@pytest.mark.parametrize("mode", ["auto", "register"])
def test_refused_registration_falls_back_once_or_names_its_cause(
    mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aiopinned.backends import cuda

    fake = _FakeRuntime()
    monkeypatch.setattr(cuda, "rt", fake)
    backend = object.__new__(cuda.CudaBackend)  # (no device here: only the memory paths)
    backend.pinning, backend._threads, backend._registered = mode, 1, {}
    backend.numa_node = None
    backend._lock = threading.Lock()
    if mode == "register":
        with pytest.raises(PinnedMemoryError, match="RLIMIT_MEMLOCK"):
            backend.alloc(4096)
        return
    caplog.set_level("WARNING", logger="aiopinned")
    assert backend.alloc(4096) and backend.alloc(8192)
    assert fake.allocs == [4096, 8192] and backend.pinning == "alloc"
    assert caplog.text.count("pinning by registration failed") == 1
