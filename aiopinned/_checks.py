"""Argument checks: a clear ``TypeError`` or ``ValueError`` at once, never a late surprise.

The hot paths check only what can fail on them inline (an exact ``int`` in range) and fall back
to these for everything else.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os

from ._sizes import ROUNDINGS
from .backends import Backend
from .backends._memory import check_pinning

BACKEND_NAMES = ("auto", "cuda", "host")
ADDRESS_LIMIT = 1 << 64  # ctypes would take larger addresses modulo 2**64


def as_size(nbytes: object, what: str = "nbytes") -> int:
    """A byte count: an ``int`` (or ``__index__``, e.g. a NumPy integer) ``>= 0``; not a bool."""
    if isinstance(nbytes, (bool, float)):
        raise TypeError(f"{what} must be an int, not {type(nbytes).__name__}")
    try:
        n = operator.index(nbytes)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(nbytes).__name__}") from None
    if n < 0:
        raise ValueError(f"{what} must be >= 0, not {n}")
    return n


def as_positive(nbytes: object, what: str) -> int:
    """A byte count ``>= 1``."""
    n = as_size(nbytes, what)
    if n < 1:
        raise ValueError(f"{what} must be >= 1, not {n}")
    return n


def as_seconds(value: object, what: str) -> float:
    """A non-negative number of seconds (``inf`` allowed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{what} is too large; use None (or inf) for no limit") from None
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{what} must be >= 0, not {value}")
    return seconds


def as_timeout(timeout: object) -> float:
    """A timeout in seconds as a float; ``None`` is ``inf``."""
    return math.inf if timeout is None else as_seconds(timeout, "timeout")


def as_callback(value: object, what: str) -> None:
    """``None`` or something callable."""
    if value is not None and not callable(value):
        raise TypeError(f"{what} must be callable, not {type(value).__name__}")


def as_flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, not {type(value).__name__}")
    return value


def as_pinning(
    pinning: object, threads: object, numa_node: object = None, device: object = None
) -> tuple[str, int | None, int | str | None, int | None]:
    """How new blocks are pinned (``auto``, ``register``, ``alloc``), by how many threads, on
    which NUMA node (``None``: wherever the kernel puts them; ``"auto"``: the device's), and for
    which CUDA device (``None``: the opening thread's)."""
    mode = check_pinning(pinning)
    if threads is not None and as_size(threads, "pin_threads") < 1:
        raise ValueError("pin_threads must be >= 1 (or None for the default)")
    node = numa_node if numa_node in (None, "auto") else as_size(numa_node, "numa_node")
    return (
        mode,
        None if threads is None else as_size(threads, "pin_threads"),
        node,
        None if device is None else as_size(device, "device"),
    )


@functools.cache
def physical_memory() -> int:
    """This machine's memory in bytes: more can never be pinned (pinned pages are resident)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - not reported: no bound but the address space
        return ADDRESS_LIMIT


def too_large(size: int, cap: int, uncapped: bool) -> str:
    """Why a request of ``size`` bytes is refused at once (``cap``: the pool's limit)."""
    if uncapped:
        return f"{size} bytes is more than this machine's memory ({cap} bytes): it cannot be pinned"
    return f"{size} bytes is more than the pool's max_bytes ({cap})"


def as_reserve(
    nbytes: object, block_bytes: object, cap: int, uncapped: bool = False
) -> tuple[int, int]:
    """``reserve``'s total and its block size (the total, by default; the last block is the
    remainder), both checked against ``cap`` (the pool's ``max_bytes``, else the machine's
    memory)."""
    total = as_size(nbytes)
    block = total if block_bytes is None else as_size(block_bytes, "block_bytes")
    if block_bytes is not None and not block:
        raise ValueError("block_bytes must be > 0")
    if total > cap:
        raise ValueError(f"cannot reserve: {too_large(total, cap, uncapped)}")
    return total, min(block, total)


def as_rounding(rounding: object) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, not {rounding!r}")
    return str(rounding)


def as_trim(max_idle_bytes: object, idle_timeout_s: object) -> tuple[int | None, float | None]:
    """Trimming's bounds: idle bytes (``None``: no bound) and idle seconds (``None``: never)."""
    idle = None if max_idle_bytes is None else as_size(max_idle_bytes, "max_idle_bytes")
    age = None if idle_timeout_s is None else as_seconds(idle_timeout_s, "idle_timeout_s")
    if age is not None and not age > 0:
        raise ValueError("idle_timeout_s must be > 0 (or None)")
    return idle, age


def as_max_bytes(max_bytes: object) -> int | None:
    """The cap: ``None`` for none, else a byte count ``> 0``."""
    if max_bytes is None:
        return None
    cap = as_size(max_bytes, "max_bytes")
    if cap == 0:
        raise ValueError("max_bytes must be > 0 (or None for no cap)")
    return cap


def as_backend(backend: object) -> str | Backend:
    """A backend name (``auto``, ``cuda``, ``host``) or an object implementing ``Backend``."""
    if isinstance(backend, str):
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, not {backend!r}")
        return backend
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a name or a Backend, not {type(backend).__name__}")
    return backend


def as_copy(dest: object, src: object, count: object) -> tuple[int, int, int]:
    """``copy_data``'s addresses and count, checked (no copy from or to address 0)."""
    dest, src, count = as_size(dest, "dest"), as_size(src, "src"), as_size(count, "count")
    if count and not (dest and src):
        raise ValueError("copy_data() with a null address")
    if max(dest, src) + count > ADDRESS_LIMIT:
        raise ValueError("copy_data() past the end of the address space")
    return dest, src, count


def pointer_of(obj: object) -> int:
    """The address of an ``int``, an object with ``data_ptr()``, or one with
    ``__array_interface__`` (what ``record_stream`` accepts besides a buffer)."""
    if isinstance(obj, bool):
        raise TypeError("record_stream() takes an address, not a bool")
    if isinstance(obj, numbers.Integral):  # an int, or a NumPy integer: its value, not its
        ptr = int(obj)  # own __array_interface__ (the scalar object's address)
    elif hasattr(obj, "data_ptr"):
        ptr = obj.data_ptr()
    elif hasattr(obj, "__array_interface__"):
        ptr = obj.__array_interface__["data"][0]
    else:
        raise TypeError(
            "record_stream() takes a PinnedBuffer, an int address, or an object with data_ptr() "
            f"or __array_interface__, not {type(obj).__name__}"
        )
    if ptr is None or not 0 <= ptr < ADDRESS_LIMIT:
        raise ValueError(f"not a valid address: {ptr!r}")
    return int(ptr)
