"""The host backend: page-aligned mmap memory and HostStream, for machines without a GPU.

It stands in for CUDA wherever there is none (CI, laptops, the examples' fallback) and behaves the
same way towards the pool: memory is page-aligned, work runs in launch order on a stream, and an
event completes once everything launched before it has run.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._hugepages import HugePages
from ._memory import REGISTER_CHUNK_BYTES, Mapped, check_pinning, default_threads
from ._numa import resolve

__all__ = ["HostBackend", "HostStream"]


def _run_stream(q: queue.SimpleQueue[Any], errors: list[BaseException]) -> None:
    while True:
        item = q.get()
        if item is None:
            return
        fn, args = item
        try:
            fn(*args)
        except BaseException as exc:  # kept for synchronize(), as CUDA keeps a stream's error
            errors.append(exc)
        # Drop the work before waiting for more: its arguments (views of pinned buffers, say)
        # must not outlive it, or the blocks they keep could never come back.
        del item, fn, args


class HostStream:
    """An ordered queue of host work: the host backend's stand-in for a CUDA stream.

    ``launch(fn, *args)`` queues a callable; callables run one after another, in launch order,
    on the stream's own thread.  An event the pool records on the stream completes once everything
    launched before it has run, exactly as a CUDA event does.  Tests gate a stream by launching a
    callable that waits on a :class:`threading.Event`.
    """

    __slots__ = ("__weakref__", "_errors", "_lock", "_name", "_queue", "_thread")

    def __init__(self, name: str | None = None) -> None:
        self._name = name or f"HostStream-{id(self):x}"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def launch(self, fn: Callable[..., object], /, *args: object) -> None:
        """Queue ``fn(*args)`` to run on the stream's thread after everything queued before."""
        if not callable(fn):
            raise TypeError(f"HostStream.launch() needs a callable, not {type(fn).__name__}")
        if self._thread is None:
            self._start()
        self._queue.put((fn, args))

    def synchronize(self) -> None:
        """Block until everything launched so far has run.

        Re-raises (once) the first exception a launched callable raised.
        """
        done = threading.Event()
        self.launch(done.set)
        done.wait()
        if self._errors:
            err = self._errors.pop(0)
            self._errors.clear()
            raise err

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            thread = threading.Thread(
                target=_run_stream, args=(self._queue, self._errors), name=self._name, daemon=True
            )
            thread.start()
            # The thread holds the queue, not the stream: when the stream goes, so does the thread.
            weakref.finalize(self, self._queue.put, None)
            self._thread = thread

    def __repr__(self) -> str:
        return f"<HostStream {self._name}>"


class _HostEvent:
    __slots__ = ("flag",)

    def __init__(self) -> None:
        self.flag = threading.Event()


class HostBackend:
    """Page-aligned anonymous ``mmap`` memory; :class:`HostStream` for streams.

    ``None`` as a stream means the backend's default stream, as it means the legacy default stream
    on CUDA.  Memory is mapped as the CUDA backend maps it (``pinning="hugetlb"`` too), and
    "registered" in the same chunks through ``register_range``, which does nothing here: a test
    backend fails it to stand in for the driver's limits.
    """

    name = "host"

    def __init__(
        self,
        threads: int | None = None,
        numa_node: int | str | None = None,
        device: int | None = None,  # (a CUDA pool's device: here there is none, and it is ignored)
        pinning: str = "auto",
    ) -> None:
        self.pinning = check_pinning(pinning)
        self.huge_pages = HugePages()
        #: the most one registration covers (``REGISTER_CHUNK_BYTES``)
        self.register_chunk_bytes = REGISTER_CHUNK_BYTES
        self._threads = default_threads() if threads is None else threads
        self.numa_node = resolve(numa_node, None, "the host backend (no device)")
        self._maps: dict[int, Mapped] = {}
        self._maps_lock = threading.Lock()
        self._events: list[_HostEvent] = []
        self.default_stream = HostStream("aiopinned-default")

    def alloc(self, size: int) -> int:
        # the CUDA backend's path, the registration a stand-in
        mapped = Mapped.registered(size, self._threads, self.numa_node, self.huge_pages,
                                   self.pinning, self.register_range, self.unregister_range,
                                   self.register_chunk_bytes)  # fmt: skip
        with self._maps_lock:
            self._maps[mapped.ptr] = mapped
        return mapped.ptr

    def register_range(self, ptr: int, size: int) -> None:
        """Where the CUDA backend calls ``cudaHostRegister``: nothing to do here."""

    def unregister_range(self, ptr: int) -> None:
        """Where the CUDA backend calls ``cudaHostUnregister``."""

    def free(self, ptr: int, size: int) -> None:
        with self._maps_lock:
            m = self._maps[ptr]
        m.unregister(self.unregister_range)  # (a failure leaves it mapped, and counted)
        with self._maps_lock:
            del self._maps[ptr]
        m.close()

    def normalize_stream(self, stream: object) -> HostStream:
        if stream is None:
            return self.default_stream
        if isinstance(stream, HostStream):
            return stream
        raise TypeError(
            f"the host backend takes a HostStream or None as a stream, not {type(stream).__name__}"
        )

    def record(self, stream: HostStream) -> _HostEvent:
        event = self._events.pop() if self._events else _HostEvent()
        event.flag.clear()
        stream.launch(event.flag.set)
        return event

    def query(self, event: _HostEvent) -> bool:
        return event.flag.is_set()

    def synchronize(self, event: _HostEvent) -> None:
        event.flag.wait()

    def synchronize_stream(self, stream: HostStream) -> None:
        done = threading.Event()
        stream.launch(done.set)  # (not HostStream.synchronize: that re-raises the work's errors)
        done.wait()

    def release_event(self, event: _HostEvent) -> None:
        self._events.append(event)

    def copy(self, dst: int, src: int, count: int) -> None:
        ctypes.memmove(dst, src, count)

    def prepare_torch(self) -> None:
        pass

    def close(self) -> None:
        self._events.clear()
