"""The device side of the examples and benchmarks: a CUDA GPU through torch, or a stand-in.

What differs between a machine with a GPU and one without lives here, once:

* :func:`pick_backend`: ``auto`` becomes ``cuda`` when torch sees a GPU, else ``host``;
* :func:`open_device`: a :class:`TorchDevice`, or a :class:`HostDevice` that runs NumPy work in
  order on :class:`aiopinned.HostStream` threads, as a GPU runs work on a stream;
* :func:`copy_by_address`: the stand-in copies by raw address, as a DMA engine reads memory, so
  queued work holds no reference to a buffer (nothing but ``record_stream`` keeps a freed
  buffer from being reused before its copy has run, exactly as on a GPU);
* the small MLP the inference server serves, and its float64 reference.

Both devices take dtype names (``"float32"``) and shapes, and the same calls: ``view`` a pinned
buffer, make a ``pageable`` host array, ``to_device``, ``to_host``, ``mlp``, ``checksum``
(:func:`byte_sum` on the device).
"""

from __future__ import annotations

import ctypes
import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from aiopinned import HostStream, PinnedBuffer

Weights = list[tuple[np.ndarray, np.ndarray]]


def cuda_usable() -> bool:
    """torch is installed and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pick_backend(backend: str) -> str:
    """``auto`` -> ``cuda`` or ``host``; ``cuda`` needs torch with a GPU for the device side."""
    if backend == "auto":
        return "cuda" if cuda_usable() else "host"
    if backend == "cuda" and not cuda_usable():
        raise SystemExit("the cuda backend needs torch with a CUDA device for the device side")
    return backend


def open_device(backend: str) -> TorchDevice | HostDevice:
    """The device for a pool on ``backend`` (``"cuda"`` or ``"host"``); blocking (CUDA starts)."""
    return TorchDevice() if backend == "cuda" else HostDevice()


def byte_sum(data: np.ndarray) -> int:
    """The checksum the examples compute on the device: the sum of the bytes, as an int64."""
    return int(data.view(np.uint8).sum(dtype=np.int64))


def copy_by_address(keep: object, dst: int, src: int, nbytes: int) -> None:
    """``memmove``, keeping the device's own array ``keep`` alive until it has run."""
    ctypes.memmove(dst, src, nbytes)


# -- the model ------------------------------------------------------------------------------------
def mlp_dims(backend: str) -> list[int]:
    """The layer widths the examples serve by default on ``backend``."""
    return [1024, 4096, 4096, 1024] if backend == "cuda" else [256, 512, 512, 256]


def make_weights(dims: Sequence[int], seed: int) -> Weights:
    """Deterministic float32 weights and biases of an MLP with layer widths ``dims``."""
    rng = np.random.default_rng(seed)
    return [
        (
            (rng.standard_normal((a, b)) / math.sqrt(a)).astype(np.float32),
            (rng.standard_normal(b) * 0.1).astype(np.float32),
        )
        for a, b in itertools.pairwise(dims)
    ]


def mlp(x: np.ndarray, weights: Weights) -> np.ndarray:
    """The MLP in NumPy, in ``x``'s precision (ReLU between layers)."""
    h = x
    for i, (w, b) in enumerate(weights):
        h = h @ w + b
        if i < len(weights) - 1:
            np.maximum(h, 0.0, out=h)
    return h


def reference(x: np.ndarray, weights: Weights) -> np.ndarray:
    """What every answer is checked against: the MLP in float64."""
    return mlp(x.astype(np.float64), weights)


# -- the devices ----------------------------------------------------------------------------------
class HostDevice:
    """No GPU: "device" arrays are NumPy arrays, and device work runs on HostStream threads."""

    name = "numpy (host)"

    def stream(self) -> HostStream:
        return HostStream()

    def view(self, buf: PinnedBuffer, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return buf.numpy(dtype, shape)  # type: ignore[no-any-return]

    def pageable(self, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, dtype)

    def to_device(self, stream: HostStream, host: np.ndarray) -> np.ndarray:
        dev = np.empty_like(host)
        stream.launch(copy_by_address, dev, dev.ctypes.data, host.ctypes.data, host.nbytes)
        return dev

    def to_host(self, stream: HostStream, dev: np.ndarray, host: np.ndarray) -> None:
        stream.launch(copy_by_address, dev, host.ctypes.data, dev.ctypes.data, dev.nbytes)

    def load(self, weights: Weights) -> Weights:
        return weights

    def mlp(self, stream: HostStream, x: np.ndarray, weights: Weights) -> np.ndarray:
        y = np.empty((x.shape[0], weights[-1][0].shape[1]), np.float32)
        stream.launch(lambda: y.__setitem__(..., mlp(x, weights)))
        return y

    def checksum(self, stream: HostStream, dev: np.ndarray) -> np.ndarray:
        """:func:`byte_sum` of a uint8 device array, as a 0-d array set once ``stream`` runs."""
        out = np.zeros((), np.int64)
        stream.launch(lambda: out.__setitem__((), byte_sum(dev)))
        return out

    def synchronize(self, stream: HostStream) -> None:
        stream.synchronize()

    def numpy(self, host: Any) -> np.ndarray:
        return np.asarray(host)


class TorchDevice:
    """The current CUDA device through torch; work is queued on torch streams."""

    name = "torch (cuda)"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", torch.cuda.current_device())

    def stream(self) -> Any:
        return self.torch.cuda.Stream(self.device)

    def view(self, buf: PinnedBuffer, dtype: str, shape: tuple[int, ...]) -> Any:
        return buf.torch(getattr(self.torch, dtype), shape)

    def pageable(self, dtype: str, shape: tuple[int, ...]) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype))

    def to_device(self, stream: Any, host: Any) -> Any:
        with self.torch.cuda.stream(stream):
            return host.to(self.device, non_blocking=True)

    def to_host(self, stream: Any, dev: Any, host: Any) -> None:
        with self.torch.cuda.stream(stream):
            host.copy_(dev, non_blocking=True)

    def load(self, weights: Weights) -> list[tuple[Any, Any]]:
        to = self.torch.from_numpy
        return [(to(w).to(self.device), to(b).to(self.device)) for w, b in weights]

    def mlp(self, stream: Any, x: Any, weights: list[tuple[Any, Any]]) -> Any:
        torch = self.torch
        with torch.cuda.stream(stream), torch.inference_mode():
            for i, (w, b) in enumerate(weights):
                x = torch.addmm(b, x, w)
                if i < len(weights) - 1:
                    x = torch.relu_(x)
            return x

    def checksum(self, stream: Any, dev: Any) -> Any:
        with self.torch.cuda.stream(stream):
            return dev.sum(dtype=self.torch.int64)

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def numpy(self, host: Any) -> np.ndarray:
        return host.cpu().numpy()  # type: ignore[no-any-return]
