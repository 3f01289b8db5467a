"""FaultBackend: the host backend, failing on purpose at chosen or random calls, or slowly."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

from aiopinned import CudaError, PinnedMemoryError
from aiopinned.backends.host import HostBackend

OPS = ("alloc", "free", "record", "query", "synchronize", "synchronize_stream", "release_event")


class FaultBackend(HostBackend):
    """Fails the n-th call of an operation (``fail_at["record"] = {2}``), or each call of the
    operations in ``random_ops`` with probability ``rate``; ``delay_s`` slows every call.

    A failed ``alloc`` raises ``PinnedMemoryError`` (the system refused), every other failure a
    ``CudaError``.  A failed ``free`` leaves the memory mapped: it is still "pinned", and
    ``pinned_bytes()`` says so, which is what the pool's ``reserved_bytes`` must match.
    """

    name = "faulty"

    def __init__(self, *, seed: int = 0, rate: float = 0.0, random_ops: tuple[str, ...] = (),
                 delay_s: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.fail_at: dict[str, set[int]] = {op: set() for op in OPS}
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.rate, self.random_ops, self.delay_s = rate, set(random_ops), delay_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _call(self, op: str) -> None:
        with self._lock:
            self.calls[op] += 1
            n = self.calls[op]
            fail = n in self.fail_at[op] or (
                op in self.random_ops and self._rng.random() < self.rate
            )
            if fail:
                self.failures[op] += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if fail:
            error = PinnedMemoryError if op == "alloc" else CudaError
            raise error(f"{op} call {n} failed (injected)")

    def pinned_bytes(self) -> int:
        with self._maps_lock:
            return sum(m.size for m in self._maps.values())

    def alloc(self, size: int) -> int:
        self._call("alloc")
        return super().alloc(size)

    def free(self, ptr: int, size: int) -> None:
        self._call("free")
        super().free(ptr, size)

    def record(self, stream: Any) -> Any:
        self._call("record")
        return super().record(stream)

    def query(self, event: Any) -> bool:
        self._call("query")
        return super().query(event)

    def synchronize(self, event: Any) -> None:
        self._call("synchronize")
        super().synchronize(event)

    def synchronize_stream(self, stream: Any) -> None:
        self._call("synchronize_stream")
        super().synchronize_stream(stream)

    def release_event(self, event: Any) -> None:
        self._call("release_event")
        super().release_event(event)
