"""The Backend protocol: the seed's runtime hooks, and nothing else.

A backend knows how to pin and unpin host memory and how to order work against a stream; it
knows nothing of asyncio.  Calls marked *blocking* may take far longer than 100 µs and are only
ever made from a worker thread.

========================  =============================  ======================================
Backend method            seed hook                      thread
========================  =============================  ======================================
``alloc(size)``           ``allocate_host_memory``       worker (blocking)
``free(ptr, size)``       ``free_block``                 worker (blocking)
``record(stream)``        ``record_stream``              loop (a few µs)
``query(event)``          ``query_event``                loop (≤ 1 µs)
``synchronize(event)``    --                             watcher thread (blocking)
``synchronize_stream(s)`` --                             worker thread (blocking)
``release_event(event)``  the event's destructor         loop
``normalize_stream(obj)`` --                             any
``copy(dst, src, n)``     ``copy_data``                  caller's
========================  =============================  ======================================
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """What :class:`~aiopinned.PinnedPool` needs from a device runtime."""

    #: ``"cuda"``, ``"host"``, or a custom backend's name
    name: str

    def alloc(self, size: int) -> int:
        """Pin ``size`` bytes of host memory and return its address (blocking).

        Raises :class:`~aiopinned.PinnedMemoryError` when the system has no more to pin.
        """
        ...

    def free(self, ptr: int, size: int) -> None:
        """Unpin and release memory that ``alloc`` returned (blocking)."""
        ...

    def normalize_stream(self, stream: object) -> Hashable:
        """Turn a user's stream object into a hashable key; ``TypeError`` if it is none."""
        ...

    def record(self, stream: Any) -> Any:
        """Record an event on a normalized stream and return it."""
        ...

    def query(self, event: Any) -> bool:
        """Whether everything queued before the event has completed (never blocks)."""
        ...

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until the event completes."""
        ...

    def synchronize_stream(self, stream: Any) -> None:
        """Block until everything queued on a normalized stream so far has run.

        The last resort when an event could not be recorded or waited on: it needs no event.
        """
        ...

    def release_event(self, event: Any) -> None:
        """Give an event back (for reuse) once nobody queries or waits on it."""
        ...

    def copy(self, dst: int, src: int, count: int) -> None:
        """Copy ``count`` bytes between host addresses (the seed's ``copy_data``)."""
        ...

    def prepare_torch(self) -> None:
        """Make torch see this backend's memory as what it is (e.g. pinned)."""
        ...

    def close(self) -> None:
        """Destroy cached events; later events are destroyed as soon as they are released."""
        ...


@runtime_checkable
class GraphCapture(Protocol):
    """What a backend whose streams can capture graphs (CUDA) adds; optional."""

    def capture_of(self, stream: Any) -> Any:
        """The capture sequence a normalized stream is in now, or ``None`` (any thread)."""
        ...

    def hold_for_graph(self, capture: Any, release: Callable[[], object]) -> None:
        """Call ``release()`` (from any thread) once the graph of ``capture``, and every
        executable graph made from it, are destroyed and their launches have ended."""
        ...
