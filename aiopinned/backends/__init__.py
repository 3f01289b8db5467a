"""Backends: the runtime hooks behind a pool (``cuda``, ``host``) and the ``auto`` choice."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .base import Backend
from .host import HostBackend, HostStream

__all__ = ["Backend", "HostBackend", "HostStream", "device_reader", "make_backend"]

log = logging.getLogger("aiopinned")


def make_backend(
    spec: str | Backend,
    pinning: str = "auto",
    threads: int | None = None,
    numa_node: int | str | None = None,
    device: int | None = None,
) -> Backend:
    """Build the backend ``spec`` names (blocking: CUDA initializes here).

    ``"auto"`` takes ``cuda`` when a CUDA device is usable, else ``host``, and logs which.
    ``pinning``, ``threads``, ``numa_node`` and ``device`` (how pages are pinned, touched, where
    they are placed, and the CUDA device they are pinned for) apply to built-in backends.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "host":
        return HostBackend(threads, numa_node, device, pinning=pinning)
    from ._cudart import cuda_unusable_reason
    from .cuda import CudaBackend

    if spec == "cuda":
        return CudaBackend(pinning, threads, numa_node, device)
    reason = cuda_unusable_reason()
    if reason is None:
        log.info("aiopinned: auto backend chose cuda")
        return CudaBackend(pinning, threads, numa_node, device)
    log.info("aiopinned: auto backend chose host (CUDA not usable: %s)", reason)
    return HostBackend(threads, numa_node, device, pinning=pinning)


def device_reader(spec: str | Backend) -> Callable[[], int | None] | None:
    """For a pool given no ``device``: the function that reads the device of the calling
    thread's CUDA context, its driver library loaded (blocking: call it off the loop; the
    function it returns takes µs, on the loop).  ``None`` where the pool will not use CUDA."""
    if spec not in ("auto", "cuda"):
        return None
    from ._cudart import context_device, cuda_unusable_reason

    if cuda_unusable_reason() is not None:
        return None
    context_device()  # loads the driver's library
    return context_device
