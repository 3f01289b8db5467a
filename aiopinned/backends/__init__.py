"""Backends: the runtime hooks behind a pool (``cuda``, ``host``) and the ``auto`` choice."""

from __future__ import annotations

import logging

from .base import Backend
from .host import HostBackend, HostStream

__all__ = ["Backend", "HostBackend", "HostStream", "make_backend"]

log = logging.getLogger("aiopinned")


def make_backend(
    spec: str | Backend,
    pinning: str = "auto",
    threads: int | None = None,
    numa_node: int | str | None = None,
) -> Backend:
    """Build the backend ``spec`` names (blocking: CUDA initializes here).

    ``"auto"`` takes ``cuda`` when a CUDA device is usable, else ``host``, and logs which.
    ``pinning``, ``threads`` and ``numa_node`` (how pages are pinned, touched, and where they are
    placed) apply to built-in backends.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "host":
        return HostBackend(threads, numa_node)
    from .cuda import CudaBackend, cuda_unusable_reason

    if spec == "cuda":
        return CudaBackend(pinning, threads, numa_node)
    reason = cuda_unusable_reason()
    if reason is None:
        log.info("aiopinned: auto backend chose cuda")
        return CudaBackend(pinning, threads, numa_node)
    log.info("aiopinned: auto backend chose host (CUDA not usable: %s)", reason)
    return HostBackend(threads, numa_node)
