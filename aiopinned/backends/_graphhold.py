"""Holding memory for a CUDA graph's lifetime: a user object retained by the graph being captured.

``cudaUserObjectCreate`` takes a destroy callback that CUDA runs on an internal thread once every
reference is gone: the graph's, and those of the executable graphs instantiated from it, which
are released only after their launches have ended.  That callback must make no CUDA call, and
must not need Python: at process exit a graph may be destroyed after the interpreter has
finalized, when a Python callback would hang or kill CUDA's thread.  So the callback is libc's
``sem_post`` on a semaphore of ours, and a thread of ours (``aiopinned-graphs``, running only
while holds are outstanding) polls the semaphores and runs the releases.

One user object serves every hold taken during one capture sequence (its id is unique for the
process's life).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ._cudart import check, relaxed_capture, rt

log = logging.getLogger("aiopinned")

#: seconds between polls of the semaphores while graphs hold memory
POLL_S = 0.02
_SEM_BYTES = 64  # sizeof(sem_t) is 32 on x86-64 and 64-bit Arm glibc; room to spare
_libc = ctypes.CDLL(None, use_errno=True)
_SEM_POST = ctypes.cast(_libc.sem_post, ctypes.c_void_p).value


class _Hold:
    __slots__ = ("releases", "sem")

    def __init__(self) -> None:
        self.sem = ctypes.create_string_buffer(_SEM_BYTES)
        if _libc.sem_init(self.sem, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")
        self.releases: list[Callable[[], object]] = []


class GraphHolds:
    """Releases tied to the graphs being captured, run once those graphs are gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holds: dict[int, _Hold] = {}  # capture id (a failed one: negative) -> its hold
        self._failed = itertools.count(1)
        self._polling = False

    def hold(self, capture_id: int, graph: Any, release: Callable[[], object]) -> None:
        """``release()`` once the graph of capture ``capture_id`` (``graph``, being captured)
        is gone; raises ``CudaError`` (and holds nothing) where CUDA refuses."""
        with self._lock, relaxed_capture():
            hold = self._holds.get(capture_id)
            if hold is None:
                hold = _Hold()
                flags = rt.cudaUserObjectFlags.cudaUserObjectNoDestructorSync
                obj = check(
                    rt.cudaUserObjectCreate(
                        ctypes.addressof(hold.sem), rt.cudaHostFn_t(_SEM_POST), 1, flags
                    ),
                    "cudaUserObjectCreate",
                )
                move = rt.cudaUserObjectRetainFlags.cudaGraphUserObjectMove
                err = rt.cudaGraphRetainUserObject(graph, obj, 1, move)[0]
                if err != rt.cudaError_t.cudaSuccess:  # (ours to drop: it posts the semaphore)
                    check(rt.cudaUserObjectRelease(obj, 1), "cudaUserObjectRelease")
                    self._holds[-next(self._failed)] = hold  # (polled until posted, then freed)
                    self._start()
                    check(err, "cudaGraphRetainUserObject")
                self._holds[capture_id] = hold
                self._start()
            hold.releases.append(release)

    def _start(self) -> None:
        if not self._polling:
            self._polling = True
            threading.Thread(target=self._poll, name="aiopinned-graphs", daemon=True).start()

    def _poll(self) -> None:
        while True:
            time.sleep(POLL_S)
            with self._lock:
                gone = [k for k, h in self._holds.items() if _libc.sem_trywait(h.sem) == 0]
                ended = [self._holds.pop(k) for k in gone]
                stop = not self._holds
                if stop:
                    self._polling = False
            for hold in ended:
                _libc.sem_destroy(hold.sem)
                for release in hold.releases:
                    try:
                        release()
                    except Exception:
                        log.exception("aiopinned: releasing memory a graph held failed")
            if stop:
                return
