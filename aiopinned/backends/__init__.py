"""Backends: the runtime hooks behind a pool (``cuda``, ``host``) and the ``auto`` choice."""

from __future__ import annotations

import logging

from .base import Backend
from .host import HostBackend, HostStream

__all__ = ["Backend", "HostBackend", "HostStream", "make_backend"]

log = logging.getLogger("aiopinned")


def make_backend(spec: str | Backend, pinning: str = "auto", threads: int | None = None) -> Backend:
    """Build the backend ``spec`` names (blocking: CUDA initializes here).

    ``"auto"`` takes ``cuda`` when a CUDA device is usable, else ``host``, and logs which.
    ``pinning`` and ``threads`` (how pages are pinned, and touched) apply to built-in backends.
    """
    if not isinstance(spec, str):
        return spec
    if spec == "host":
        return HostBackend(threads)
    from .cuda import CudaBackend, cuda_unusable_reason

    if spec == "cuda":
        return CudaBackend(pinning, threads)
    reason = cuda_unusable_reason()
    if reason is None:
        log.info("aiopinned: auto backend chose cuda")
        return CudaBackend(pinning, threads)
    log.info("aiopinned: auto backend chose host (CUDA not usable: %s)", reason)
    return HostBackend(threads)
