"""The way back into the pool's event loop from other threads, and calls that leave it.

``LoopPort`` wraps the one primitive each event loop offers to foreign threads (asyncio's
``call_soon_threadsafe``, trio's ``run_sync_soon``) and knows the pool's loop and thread.

``run_off_loop`` runs a blocking backend call in a worker thread and never loses its result: if
the awaiting task is cancelled (or times out) first, the result is handed to ``on_orphan`` on the
loop once the thread finishes, so memory pinned for a caller who went away is adopted, not leaked.
``run_detached`` hands work nobody awaits to one long-lived reaper thread (safe from finalizers).
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import logging
import queue
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")
log = logging.getLogger("aiopinned")

__all__ = ["LoopGone", "LoopPort", "run_detached", "run_off_loop", "start_reaper", "start_thread"]


class LoopPort:
    """The pool's event loop, seen from anywhere."""

    __slots__ = ("_native", "_post", "call_soon", "is_current", "spawn", "thread_id", "token")

    def __init__(self) -> None:
        self.token = anyio.lowlevel.current_token()
        native: Any = self.token.native_token
        self._native = native
        self.thread_id = threading.get_ident()
        if isinstance(native, asyncio.AbstractEventLoop):
            tasks: set[asyncio.Task[None]] = set()

            def spawn(async_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
                task = native.create_task(async_fn())
                tasks.add(task)  # (the loop holds tasks weakly)
                task.add_done_callback(tasks.discard)

            self.spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], None] = spawn
            self._post = native.call_soon_threadsafe
            #: schedule from the loop's own thread (no wake-up of the selector)
            self.call_soon: Callable[..., object] = native.call_soon
            get_loop = asyncio._get_running_loop
            self.is_current: Callable[[], bool] = lambda: get_loop() is native
        else:  # trio: anyio's native token is the TrioToken
            import trio

            def spawn_system_task(async_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
                trio.lowlevel.spawn_system_task(async_fn)

            self.spawn = spawn_system_task
            self._post = native.run_sync_soon
            self.call_soon = native.run_sync_soon
            current = trio.lowlevel.current_trio_token

            def is_current() -> bool:
                try:
                    return current() is native
                except RuntimeError:
                    return False

            self.is_current = is_current

    def submit(
        self, async_fn: Callable[[], Awaitable[T]]
    ) -> tuple[concurrent.futures.Future[T], Callable[[], None]]:
        """From another thread: run ``async_fn()`` as a task of the loop.  Returns its future,
        and a function that cancels it (before it starts, or while it runs; any thread).

        Raises ``LoopGone`` when the loop has stopped.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        scopes: list[anyio.CancelScope] = []

        async def run() -> None:
            try:
                with anyio.CancelScope() as scope:
                    scopes.append(scope)
                    future.set_result(await async_fn())
                    return
            except BaseException as exc:  # the task's own error, or the loop shutting down
                if not future.done():
                    cancelled = concurrent.futures.CancelledError()
                    future.set_exception(exc if isinstance(exc, Exception) else cancelled)
                if not isinstance(exc, Exception):
                    raise
                return
            future.set_exception(concurrent.futures.CancelledError())  # cancel() stopped it

        def start() -> None:
            if future.set_running_or_notify_cancel():
                self.spawn(run)

        def cancel_running() -> None:
            for scope in scopes:
                scope.cancel()

        def cancel() -> None:
            if not future.cancel():
                self.post(cancel_running)

        if not self.post(start):
            raise LoopGone("the event loop has stopped")
        return future, cancel

    def call(
        self, async_fn: Callable[[], Awaitable[T]], *, timeout: float,
        on_orphan: Callable[[T], object],
    ) -> T:  # fmt: skip
        """From another thread: ``await async_fn()`` on the loop, waiting at most ``timeout``
        seconds, whether or not the loop is running meanwhile.  A result that arrives after the
        caller gave up is handed to ``on_orphan`` instead of being lost.

        Raises ``TimeoutError``; ``LoopGone`` if the loop stops first; what the call raised.
        """
        future, cancel = self.submit(async_fn)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return future.result(max(0.0, min(deadline - time.monotonic(), 0.25)))
            except concurrent.futures.TimeoutError:
                pass
            if time.monotonic() >= deadline:
                error: Exception = TimeoutError(f"no result within {timeout} s")
            elif not self.alive():
                error = LoopGone("the event loop has stopped")
            else:
                continue
            cancel()

            def adopt(done: concurrent.futures.Future[T]) -> None:
                if not done.cancelled() and done.exception() is None:
                    on_orphan(done.result())

            future.add_done_callback(adopt)
            raise error

    def call_later(self, delay: float, fn: Callable[[], object]) -> Callable[[], None]:
        """Loop thread: ``fn()`` on the loop after ``delay`` seconds; returns a canceller."""
        native = self._native
        if isinstance(native, asyncio.AbstractEventLoop):
            return native.call_later(delay, fn).cancel
        scope = anyio.CancelScope()

        async def later() -> None:
            with scope:
                await anyio.sleep(delay)
                fn()

        self.spawn(later)
        return scope.cancel

    def alive(self) -> bool:
        """Whether the loop can still run anything (it may be paused, not stopped)."""
        return self.post(_nothing)

    def post(self, fn: Callable[..., object], *args: object) -> bool:
        """Run ``fn(*args)`` on the loop soon; safe from any thread and from finalizers.

        Returns ``False`` when the loop has stopped and can run nothing more.
        """
        try:
            self._post(fn, *args)
        except RuntimeError:  # loop closed / trio run finished
            return False
        return True


class LoopGone(RuntimeError):
    """The event loop has stopped: nothing more can run on it."""


def _nothing() -> None:
    pass


class _Call:
    __slots__ = ("done", "error", "lock", "orphan", "result")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.orphan: Callable[[Any, BaseException | None], None] | None = None
        self.result: Any = None
        self.error: BaseException | None = None


async def run_off_loop(
    port: LoopPort,
    fn: Callable[..., T],
    *args: object,
    on_orphan: Callable[[Any, BaseException | None], None],
) -> T:
    """``await`` ``fn(*args)`` in a thread of its own; cancellation returns at once.

    The thread is started before the first checkpoint, so ``fn`` always runs.  If the caller
    leaves early (cancelled, timed out), ``on_orphan(result, error)`` runs on the loop when ``fn``
    finishes, exactly once, instead of the outcome being dropped.

    A plain thread rather than ``anyio.to_thread``: that one checks for cancellation before it
    submits the call, and from outside it is impossible to tell "never ran" from "abandoned".
    These calls pin or unpin memory and take milliseconds to seconds; starting a thread is noise.
    """
    call = _Call()
    finished = anyio.Event()

    def work() -> None:
        try:
            result: Any = fn(*args)
            error: BaseException | None = None
        except BaseException as exc:
            result, error = None, exc
        with call.lock:
            call.done, call.result, call.error = True, result, error
            orphan = call.orphan
        if orphan is None:
            port.post(finished.set)
        elif not port.post(orphan, result, error):
            orphan(result, error)  # the loop is gone: settle it here rather than lose it

    start_thread(work)
    try:
        await finished.wait()
    except BaseException:
        with call.lock:
            done = call.done
            if not done:
                call.orphan = on_orphan
        if done:
            on_orphan(call.result, call.error)  # it finished, but we leave without its outcome
        raise
    if call.error is not None:
        raise call.error
    return call.result  # type: ignore[no-any-return]


class _Reaper:
    """One daemon thread for work nobody awaits (unpinning memory whose loop is gone, say).

    Handing it work is a ``SimpleQueue.put``: reentrant, never blocking, so finalizers may do it.
    The thread is started when a pool opens (``start``), never from a finalizer at interpreter
    shutdown: work handed over then, with no thread to run it, is dropped, and the process's end
    reclaims what it would have released.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if sys.is_finalizing():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():  # (a fork loses it)
                self._thread = threading.Thread(target=self._run, name="aiopinned-reaper",
                                                daemon=True)  # fmt: skip
                self._thread.start()

    def put(self, fn: Callable[[], object]) -> None:
        self._queue.put(fn)
        thread = self._thread
        if (thread is None or not thread.is_alive()) and not sys.is_finalizing():
            self.start()

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                fn()
            except Exception:
                log.exception("aiopinned: background work failed")
            del fn


_REAPER = _Reaper()
start_reaper = _REAPER.start


def start_thread(fn: Callable[[], object]) -> None:
    """``fn()`` in a daemon thread, started now, not waiting for it to run (docs/design.md)."""
    _thread.start_new_thread(fn, ())


def run_detached(fn: Callable[[], object]) -> None:
    """Run ``fn()`` in the reaper thread, with no one awaiting it; safe from finalizers."""
    _REAPER.put(fn)
