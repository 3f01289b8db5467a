from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aiopinned.backends.host import HostBackend

_LOOPS: list[Any] = [pytest.param(("asyncio", {}), id="asyncio")]
if importlib.util.find_spec("uvloop"):
    _LOOPS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))
if importlib.util.find_spec("trio"):
    _LOOPS.append(pytest.param(("trio", {}), id="trio"))


@pytest.fixture(params=_LOOPS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """Every anyio test runs under asyncio, uvloop and trio (where installed)."""
    return request.param


@pytest.fixture
def asyncio_only(anyio_backend_name: str) -> None:
    """For the races where a task is cancelled after it was rescheduled (CPython gh-90155):
    trio never cancels such a task, so the race does not exist there (its own tests cover
    trio's side)."""
    if anyio_backend_name != "asyncio":
        pytest.skip("trio never cancels a task that was already rescheduled")


def _cuda_reason() -> str | None:
    try:
        from aiopinned.backends._cudart import cuda_unusable_reason
    except Exception as exc:  # pragma: no cover
        return str(exc)
    return cuda_unusable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any("gpu" in item.keywords for item in items):
        return
    reason = _cuda_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA device: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class RecordingBackend(HostBackend):
    """The host backend, recording which thread made each blocking call, and able to fail."""

    name = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.alloc_threads: list[int] = []
        self.free_threads: list[int] = []
        self.freed = threading.Semaphore(0)
        self.fail_allocs = 0  # fail the next N allocs with PinnedMemoryError
        self.fail_if: Callable[[int], bool] | None = None
        self.alloc_gate: threading.Event | None = None
        self.synchronizing = threading.Event()  # set when a thread waits on an event

    def alloc(self, size: int) -> int:
        from aiopinned import PinnedMemoryError

        self.alloc_threads.append(threading.get_ident())
        if self.alloc_gate is not None:
            self.alloc_gate.wait()
        if self.fail_allocs or (self.fail_if is not None and self.fail_if(size)):
            self.fail_allocs = max(0, self.fail_allocs - 1)
            raise PinnedMemoryError(f"refused to pin {size} bytes (test)")
        return super().alloc(size)

    def synchronize(self, event: Any) -> None:
        self.synchronizing.set()
        super().synchronize(event)

    def synchronize_stream(self, stream: Any) -> None:
        self.synchronizing.set()
        super().synchronize_stream(stream)

    def free(self, ptr: int, size: int) -> None:
        self.free_threads.append(threading.get_ident())
        super().free(ptr, size)
        self.freed.release()


@pytest.fixture
def recording() -> RecordingBackend:
    return RecordingBackend()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Step the loop until ``predicate()`` holds: for work that arrives from another thread (a
    HostStream, a finalizer, a free() from a thread, an HTTP client), whose timing the test does
    not own.  The bound is a safety net against a hang, not a synchronization: it fails the test
    only when the condition never comes."""
    for _ in range(1000):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await anyio.sleep(0.001)  # another thread's work is on its way: yield the GIL to it
    raise AssertionError(f"condition not reached in {timeout} s")


async def settle(steps: int = 20) -> None:
    """Step the loop a few times so callbacks already posted to it have run."""
    for _ in range(steps):
        await anyio.lowlevel.checkpoint()


def spin_until_past(deadline: float) -> None:
    """Hold the loop thread until ``anyio.current_time()`` has passed ``deadline`` (no sleep:
    the test knows the deadline is over when this returns)."""
    while anyio.current_time() <= deadline:
        pass


class Gate:
    """A HostStream gate: work launched after ``close()`` runs only after ``open()``."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __call__(self) -> None:
        self._event.wait(timeout=30)

    def open(self) -> None:
        self._event.set()


async def cancel_a_held_reserve(
    pool: Any, recording: RecordingBackend, nbytes: int, block_bytes: int, held_after: int,
    pins: int,
) -> list[int]:  # fmt: skip
    """``pool.reserve(nbytes, block_bytes=...)`` on ``recording``, its next pin held once
    ``held_after`` bytes are pinned, cancelled once that pin (the ``pins``-th) has started; the
    progress it reported.  The held pin is still gated: set ``recording.alloc_gate`` to let it
    finish."""
    recording.alloc_gate = threading.Event()
    recording.alloc_gate.set()
    pinned: list[int] = []

    def progress(done: int, total: int) -> None:
        pinned.append(done)
        if done == held_after:
            recording.alloc_gate.clear()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pool.reserve(nbytes, block_bytes=block_bytes, progress=progress))
            await until(lambda: len(recording.alloc_threads) == pins)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    return pinned
