"""One checkpoint on every rank of a ``torch.distributed`` group, read once: each rank reads its
share of the bytes (``load_safetensors`` with ``names=`` its tensors) and receives the rest from
their readers by broadcast (NCCL: over NVLink, GPU to GPU; gloo: host tensors, as CI runs it).

The share is the tensors in checkpoint order cut into ``world_size`` runs of about equal bytes,
so each rank's reads are long and sequential.  Every rank computes the same plan from the same
headers, checks every tensor before any collective (a dtype this rank cannot make fails on every
rank alike), and the ranks agree, by one all-reduce, that every share loaded before any
broadcast starts: a rank whose share failed makes the others raise too, rather than leaving
them blocked in a broadcast.  The collectives run in a thread (they block), never on the loop.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio

from ._format import DTYPES, Entry, Paths, checkpoint_files, read_header, select
from ._reader import ReadReport
from ._targets import TORCH_DTYPES, CudaTarget, HostTarget


def owners(entries: Sequence[Entry], ranks: int) -> list[int]:
    """The rank that reads each of ``entries`` (in order): ``ranks`` runs of about equal bytes,
    each tensor to the run its middle byte falls in."""
    total, before, out = sum(e.nbytes for e in entries) or 1, 0, []
    for entry in entries:
        out.append(min(ranks - 1, (2 * before + entry.nbytes) * ranks // (2 * total)))
        before += entry.nbytes
    return out


async def load_shared(
    load: Callable[..., Awaitable[Any]],
    paths: Paths,
    device: Any,
    group: Any,
    names: Iterable[str] | None,
    options: dict[str, Any],
) -> tuple[dict[str, Any], ReadReport]:
    """``load(paths, device, names=..., **options)`` of this rank's share, then the rest by
    broadcast: the whole checkpoint by name, and this rank's ``ReadReport``."""
    dist = _distributed()
    if not dist.is_initialized():
        raise ValueError("group= needs torch.distributed initialized (init_process_group)")
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("group=: this process is not a member of that group")
    files = checkpoint_files(paths)
    headers = await anyio.to_thread.run_sync(lambda: [read_header(f) for f in files])
    order = [e for entries in select(headers, names) for e in entries]
    (HostTarget if device is None else CudaTarget).check(order)  # (every rank alike)
    readers = owners(order, ranks)
    mine = [e.name for e, r in zip(order, readers, strict=True) if r == rank]
    failure: BaseException | None = None
    try:
        loaded = await load(paths, device, names=mine, **options)
    except Exception as exc:  # (said to the other ranks first, then raised)
        failure, loaded = exc, None
    exchange = _Exchange(dist, group, device, rank)
    all_ok = await anyio.to_thread.run_sync(exchange.agree, failure is None)
    if failure is not None:
        raise failure
    if not all_ok:
        raise RuntimeError("another rank of the group failed to load its share of the checkpoint")
    got = await anyio.to_thread.run_sync(exchange.broadcast, order, readers, loaded)
    return got, loaded.report


def _distributed() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        raise ValueError("group= needs torch (torch.distributed)") from None
    if not dist.is_available():
        raise ValueError("group= needs a torch built with torch.distributed")
    return dist


class _Exchange:
    """The collectives, in a thread: the agreement, then one broadcast per tensor from its
    reader, in checkpoint order (the same on every rank)."""

    def __init__(self, dist: Any, group: Any, device: Any, rank: int) -> None:
        import torch

        self.dist, self.group, self.rank, self.torch = dist, group, rank, torch
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def agree(self, ok: bool) -> bool:
        torch = self.torch
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=self.device or "cpu")
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def broadcast(
        self, order: Sequence[Entry], readers: Sequence[int], loaded: Any
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for entry, reader in zip(order, readers, strict=True):
            tensor = loaded[entry.name] if reader == self.rank else self._empty(entry)
            if entry.nbytes:
                src = self.dist.get_global_rank(self.group, reader)
                self.dist.broadcast(self._bytes(tensor), src=src, group=self.group)
            out[entry.name] = tensor
        if self.device is not None:
            self.torch.cuda.synchronize(self.device)
        return out

    def _empty(self, entry: Entry) -> Any:
        if self.device is None:
            import numpy as np

            return np.empty(entry.shape, dtype=DTYPES[entry.dtype][1])
        dtype = getattr(self.torch, TORCH_DTYPES[entry.dtype])
        return self.torch.empty(entry.shape, dtype=dtype, device=self.device)

    def _bytes(self, tensor: Any) -> Any:
        """The tensor's bytes as a flat uint8 tensor sharing its memory (what is broadcast)."""
        if self.device is None:
            import numpy as np

            return self.torch.from_numpy(tensor.reshape(-1).view(np.uint8))
        return tensor.reshape(-1).view(self.torch.uint8)
