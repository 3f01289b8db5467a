"""The way back into the pool's event loop from other threads, and calls that leave it.

``LoopPort`` wraps the one primitive each event loop offers to foreign threads
(``loop.call_soon_threadsafe`` on asyncio and uvloop, ``TrioToken.run_sync_soon`` on trio) and
knows which loop and thread the pool belongs to.

``run_off_loop`` runs a blocking backend call in a worker thread and never loses its result: if
the awaiting task is cancelled (or times out) first, the result is handed to ``on_orphan`` on the
loop once the thread finishes, so memory pinned for a caller who went away is adopted, not leaked.
``run_detached`` is the one other way the pool starts a thread: work nobody awaits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

T = TypeVar("T")

__all__ = ["LoopPort", "run_detached", "run_off_loop"]


class LoopPort:
    """The pool's event loop, seen from anywhere."""

    __slots__ = ("_native", "_post", "call_soon", "is_current", "thread_id", "token")

    def __init__(self) -> None:
        self.token = anyio.lowlevel.current_token()
        native: Any = self.token.native_token
        self._native = native
        self.thread_id = threading.get_ident()
        if isinstance(native, asyncio.AbstractEventLoop):
            self._post = native.call_soon_threadsafe
            #: schedule from the loop's own thread (no wake-up of the selector)
            self.call_soon: Callable[..., object] = native.call_soon
            get_loop = asyncio._get_running_loop
            self.is_current: Callable[[], bool] = lambda: get_loop() is native
        else:  # trio: anyio's native token is the TrioToken
            import trio

            self._post = native.run_sync_soon
            self.call_soon = native.run_sync_soon
            current = trio.lowlevel.current_trio_token

            def is_current() -> bool:
                try:
                    return current() is native
                except RuntimeError:
                    return False

            self.is_current = is_current

    def post(self, fn: Callable[..., object], *args: object) -> bool:
        """Run ``fn(*args)`` on the loop soon; safe from any thread and from finalizers.

        Returns ``False`` when the loop has stopped and can run nothing more.
        """
        try:
            self._post(fn, *args)
        except RuntimeError:  # loop closed / trio run finished
            return False
        return True


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

    run_detached(work, "aiopinned-backend")
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


def run_detached(fn: Callable[[], object], name: str) -> None:
    """Run ``fn()`` in a daemon thread of its own, with no one awaiting it."""
    threading.Thread(target=fn, name=name, daemon=True).start()
