"""The prefetch pipeline, measured: shards on disk to the GPU through aiopinned, against pageable
memory, ``DataLoader(pin_memory=True)``, the reads alone and the copy ceiling.

    python benchmarks/bench_prefetch.py                           # 1 GiB on a GPU, 64 MiB host
    python benchmarks/bench_prefetch.py --size-gib 8 --shard-mib 64 --depth 32 --readers 16

The dataset (``--data``, default ``$TMPDIR/aiopinned-shards``) is created on the first run at the
size asked for, with a manifest of each shard's checksum.  The pipeline is the one
``examples/prefetch_pipeline.py`` teaches, made to run flat out:

* one task takes a pool buffer for each shard in order (the pool's cap, ``--depth`` shards, bounds
  the read-ahead), and ``--readers`` shards are read at once with ``os.preadv`` in threads;
* the consumer queues each shard's copy on a copy stream into a ring of device slots and its
  compute on a compute stream (a checksum, and ``--work`` matrix products standing in for a
  training step), and frees the buffer with ``record_stream``;
* every shard's checksum is checked against the manifest.

Beside it: the same pipeline on pageable buffers (copies made from a worker thread, since a copy
from pageable memory blocks its caller), DataLoader with pinned memory, the reads alone, and a
pinned buffer copied over and over.  It prints GB/s and how long the compute stream sat idle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _device import byte_sum, copy_by_address, pick_backend
from prefetch_pipeline import read_into

from aiopinned import HostStream, PinnedPool
from aiopinned.loader._reader import drop_page_cache

MiB = 1 << 20
GB = 1e9


# -- the dataset ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    root: Path
    count: int
    shard_bytes: int
    checksums: tuple[int, ...]

    def path(self, i: int) -> Path:
        return self.root / f"shard-{i:05d}.bin"

    @property
    def nbytes(self) -> int:
        return self.count * self.shard_bytes


def open_dataset(
    root: Path, count: int, shard_bytes: int, seed: int = 0, log: Callable[[str], None] = print
) -> Dataset:
    """The dataset in ``root``; (re)created first if it is missing or of another shape."""
    if shard_bytes <= 0 or shard_bytes % 4096 or count <= 0:
        raise ValueError("shards must be a positive multiple of 4096 bytes, and at least one")
    manifest = root / "manifest.json"
    want = {"count": count, "shard_bytes": shard_bytes, "seed": seed, "checksum": "byte_sum"}
    try:
        meta = json.loads(manifest.read_text())
        if {k: meta[k] for k in want} == want and all(
            Dataset(root, count, shard_bytes, ()).path(i).stat().st_size == shard_bytes
            for i in range(count)
        ):
            return Dataset(root, count, shard_bytes, tuple(meta["checksums"]))
    except (OSError, ValueError, KeyError):
        pass
    log(f"creating {count} shards of {shard_bytes / MiB:g} MiB in {root} ...")
    root.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    for old in root.glob("shard-*.bin"):
        old.unlink()
    sums = []
    for i in range(count):
        data = np.frombuffer(np.random.default_rng([seed, i]).bytes(shard_bytes), np.uint8)
        sums.append(byte_sum(data))
        with open(Dataset(root, count, shard_bytes, ()).path(i), "wb") as f:
            f.write(data.data)
            os.fsync(f.fileno())
    manifest.write_text(json.dumps({**want, "checksums": sums}))
    return Dataset(root, count, shard_bytes, tuple(sums))


def evict(ds: Dataset) -> None:
    """Drop the shards from the page cache (for a cold read)."""
    drop_page_cache(ds.path(i) for i in range(ds.count))


# -- the device side: copy stream + compute stream ------------------------------------------------
class ChecksumError(AssertionError):
    pass


class TorchDevice:
    """Shards copied into a ring of device slots on a copy stream, computed on a compute stream.

    The copy into a slot waits (on the GPU) for the compute that last read it; the compute of a
    shard waits for its copy.  The host only queues work.
    """

    name = "cuda"

    def __init__(self, count: int, shard_bytes: int, work: int, slots: int = 3) -> None:
        import torch

        self.torch = torch
        dev = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(dev)
        self.compute_stream = torch.cuda.Stream(dev)
        self.slots = [torch.empty(shard_bytes, dtype=torch.uint8, device=dev) for _ in range(slots)]
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.computed = [torch.cuda.Event() for _ in range(slots)]
        self.sums = torch.zeros(count, dtype=torch.int64, device=dev)
        self.work = work
        self.k = 1024 if shard_bytes % 2048 == 0 else 1
        self.weight = torch.randn(self.k, self.k, device=dev).to(torch.bfloat16) / self.k
        self.scratch = torch.empty(shard_bytes // 2, dtype=torch.bfloat16, device=dev)
        self.timing: list[tuple[Any, Any]] = []
        torch.cuda.synchronize(dev)

    def submit_pageable(self, i: int, host: np.ndarray) -> None:
        """``submit`` from pageable memory: returns once CUDA has staged the data (blocking)."""
        self.submit(i, self.torch.from_numpy(host))

    def host_view(self, buf: Any) -> Any:
        return buf.torch()

    def submit(self, i: int, host: Any) -> None:
        torch, s = self.torch, i % len(self.slots)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.computed[s])
            self.slots[s].copy_(host, non_blocking=True)
            self.copied[s].record(self.copy_stream)
        with torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(self.copied[s])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.compute_stream)
            self.sums[i] = self.slots[s].sum(dtype=torch.int64)
            x = self.slots[s].view(torch.bfloat16).view(-1, self.k)
            out = self.scratch.view(-1, self.k)
            for _ in range(self.work):
                torch.mm(x, self.weight, out=out)
            end.record(self.compute_stream)
            self.computed[s].record(self.compute_stream)
        self.timing.append((start, end))

    def finish(self) -> tuple[list[int], float]:
        """Wait for everything; the checksums and the seconds the compute stream was busy."""
        self.compute_stream.synchronize()
        busy = sum(a.elapsed_time(b) for a, b in self.timing) / 1e3
        return self.sums.cpu().tolist(), busy


class HostDevice:
    """The host backend's stand-in: the same two streams as :class:`HostStream` threads."""

    name = "host"

    def __init__(self, count: int, shard_bytes: int, work: int, slots: int = 3) -> None:
        self.copy_stream, self.compute_stream = HostStream("copy"), HostStream("compute")
        self.slots = [np.empty(shard_bytes, np.uint8) for _ in range(slots)]
        self.copied = [threading.Event() for _ in range(count)]
        self.computed = [threading.Event() for _ in range(count)]
        self.sums = [0] * count
        self.work = work
        self.busy = 0.0

    def host_view(self, buf: Any) -> Any:
        return buf.numpy()

    def submit(self, i: int, host: np.ndarray) -> None:
        # By address, as a DMA engine reads it: the queued copy keeps no view of the buffer, so
        # only record_stream keeps a freed buffer from being reused before the copy has run.
        self.copy_stream.launch(self._copy, i, host.ctypes.data, host.nbytes)
        self.compute_stream.launch(self._compute, i)

    def submit_pageable(self, i: int, host: np.ndarray) -> None:
        self.submit(i, host)
        self.copied[i].wait()  # as CUDA does: return once the data is out of the buffer

    def _copy(self, i: int, src: int, nbytes: int) -> None:
        n = len(self.slots)
        if i >= n:
            self.computed[i - n].wait()
        copy_by_address(None, self.slots[i % n].ctypes.data, src, nbytes)
        self.copied[i].set()

    def _compute(self, i: int) -> None:
        self.copied[i].wait()
        t0 = time.perf_counter()
        data = self.slots[i % len(self.slots)]
        self.sums[i] = byte_sum(data)
        for _ in range(self.work):
            np.bitwise_xor.reduce(data.view(np.uint64))
        self.busy += time.perf_counter() - t0
        self.computed[i].set()

    def finish(self) -> tuple[list[int], float]:
        self.compute_stream.synchronize()
        self.copy_stream.synchronize()
        return list(self.sums), self.busy


def make_device(gpu: bool, ds: Dataset, work: int) -> TorchDevice | HostDevice:
    return (TorchDevice if gpu else HostDevice)(ds.count, ds.shard_bytes, work)


# -- the pipelines --------------------------------------------------------------------------------
@dataclass
class Report:
    name: str
    nbytes: int
    seconds: float
    compute_busy_s: float = math.nan
    delivered: list[int] = field(default_factory=list, repr=False)
    peak_read_ahead: int = 0
    waits: int = 0

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / GB

    @property
    def compute_idle_s(self) -> float:
        return self.seconds - self.compute_busy_s


def verify(ds: Dataset, delivered: list[int], sums: list[int]) -> None:
    """Every shard exactly once, in order, with the manifest's checksum."""
    if delivered != list(range(ds.count)):
        raise ChecksumError(f"shards delivered out of order or not once each: {delivered[:20]}")
    bad = [i for i in range(ds.count) if sums[i] != ds.checksums[i]]
    if bad:
        raise ChecksumError(f"{len(bad)} shards failed their checksum, first {bad[:10]}")


async def read_in_order(
    ds: Dataset,
    *,
    readers: int,
    acquire: Callable[[], Awaitable[Any]],
    memory_of: Callable[[Any], memoryview],
    consume: Callable[[int, Any], Awaitable[None]],
) -> list[int]:
    """Read every shard into a buffer from ``acquire()``; ``consume(i, buf)`` each, in order.

    One task acquires buffers in shard order (so whatever bounds ``acquire`` bounds the
    read-ahead, and the buffers held are always the oldest shards'), ``readers`` shards are read
    at once in worker threads, and shards are consumed in order as their reads finish.  Returns
    the shard indices in the order they were consumed.
    """
    limiter = anyio.CapacityLimiter(readers)
    send, recv = anyio.create_memory_object_stream[tuple[int, Any, anyio.Event]](ds.count)
    delivered: list[int] = []

    async def read(i: int, buf: Any, done: anyio.Event) -> None:
        await anyio.to_thread.run_sync(read_into, ds.path(i), memory_of(buf), limiter=limiter)
        done.set()

    async def produce() -> None:
        async with send, anyio.create_task_group() as readers_tg:
            for i in range(ds.count):
                buf = await acquire()
                done = anyio.Event()
                send.send_nowait((i, buf, done))
                readers_tg.start_soon(read, i, buf, done)

    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async with recv:
            async for i, buf, done in recv:
                await done.wait()
                delivered.append(i)
                await consume(i, buf)
    return delivered


async def pinned_pipeline(
    ds: Dataset,
    pool: PinnedPool,
    device: TorchDevice | HostDevice | None,
    *,
    readers: int,
    name: str = "aiopinned",
    after_read: Callable[[int, Any], None] | None = None,
) -> Report:
    """One pass over the dataset through ``pool`` (``device=None``: the reads alone).

    ``pool.max_bytes`` bounds the read-ahead; ``after_read(i, buf)`` (tests) sees each shard as
    it is consumed.
    """
    waits_before = pool.stats().num_waits
    t0 = time.perf_counter()

    async def consume(i: int, buf: Any) -> None:
        if after_read is not None:
            after_read(i, buf)
        if device is not None:
            device.submit(i, device.host_view(buf))
            buf.record_stream(device.copy_stream)  # comes back once its copy is done
        buf.free()

    delivered = await read_in_order(
        ds,
        readers=readers,
        acquire=lambda: pool.allocate(ds.shard_bytes),
        memory_of=lambda buf: buf.memoryview(),
        consume=consume,
    )
    if device is not None:
        await pool.synchronize(device.compute_stream)
    seconds = time.perf_counter() - t0
    stats = pool.stats()
    report = Report(
        name,
        ds.nbytes,
        seconds,
        delivered=delivered,
        peak_read_ahead=stats.peak_reserved_bytes // ds.shard_bytes,
        waits=stats.num_waits - waits_before,
    )
    if device is not None:
        sums, report.compute_busy_s = await anyio.to_thread.run_sync(device.finish)
        verify(ds, delivered, sums)
    return report


async def pageable_pipeline(
    ds: Dataset, buffers: list[np.ndarray], device: TorchDevice | HostDevice, *, readers: int
) -> Report:
    """The same pipeline on pageable ``buffers``, recycled by hand (their number bounds it)."""
    free_send, free_recv = anyio.create_memory_object_stream[np.ndarray](len(buffers))
    for arr in buffers:
        free_send.send_nowait(arr)
    t0 = time.perf_counter()

    async def consume(i: int, arr: np.ndarray) -> None:
        # A copy from pageable memory blocks its caller until the data is staged: it runs in a
        # thread, and the buffer can be reused once it returns.
        await anyio.to_thread.run_sync(device.submit_pageable, i, arr)
        free_send.send_nowait(arr)

    delivered = await read_in_order(
        ds, readers=readers, acquire=free_recv.receive, memory_of=memoryview, consume=consume
    )
    sums, busy = await anyio.to_thread.run_sync(device.finish)
    seconds = time.perf_counter() - t0
    verify(ds, delivered, sums)
    return Report("pageable", ds.nbytes, seconds, busy, delivered, len(buffers))


def dataloader_epochs(
    ds: Dataset, make: Callable[[], TorchDevice], *, depth: int, readers: int, epochs: int = 2
) -> Report:
    """What torch users run today: DataLoader workers and ``pin_memory=True``.

    Persistent workers, and only the last epoch is timed: worker start-up is left out.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _ShardSet(ds),
        batch_size=None,
        num_workers=readers,
        pin_memory=True,
        prefetch_factor=max(1, depth // readers),
        persistent_workers=True,
    )
    for _ in range(epochs):
        device = make()
        delivered = []
        t0 = time.perf_counter()
        for i, t in enumerate(loader):
            delivered.append(i)
            device.submit(i, t)
        sums, busy = device.finish()
        seconds = time.perf_counter() - t0
        verify(ds, delivered, sums)
    return Report("DataLoader(pin_memory)", ds.nbytes, seconds, busy, delivered, depth)


class _ShardSet:
    """A map-style dataset of the shards (module level, so DataLoader workers can pickle it)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return self.ds.count

    def __getitem__(self, i: int) -> Any:
        import torch

        t = torch.empty(self.ds.shard_bytes, dtype=torch.uint8)
        read_into(self.ds.path(i), memoryview(t.numpy()))
        return t


def copy_ceiling(shard_bytes: int) -> float:
    """GB/s of a plain pinned host→device copy of one shard, repeated (torch's pinned memory)."""
    import torch

    src = torch.empty(shard_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(shard_bytes, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return n * shard_bytes / (time.perf_counter() - t0) / GB


# -- the command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / "aiopinned-shards"
    )
    parser.add_argument(
        "--size-gib",
        type=float,
        default=0,
        help="dataset size (default 1 on a GPU, 1/16 on the host)",
    )
    parser.add_argument(
        "--shard-mib", type=int, default=0, help="shard size (default 64 on a GPU, 4 on the host)"
    )
    parser.add_argument("--depth", type=int, default=8, help="shards read ahead (the pool's cap)")
    parser.add_argument(
        "--readers",
        type=int,
        default=0,
        help="shards read at once (default min(depth, 8), 2 on the host)",
    )
    parser.add_argument(
        "--work",
        type=int,
        default=-1,
        help="matrix products per shard on the compute stream (default 4 on a GPU, 0 on the host)",
    )
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    parser.add_argument(
        "--cold", action="store_true", help="drop the shards from the page cache before each run"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated runs to leave out: pageable,dataloader,reads"
    )
    args = parser.parse_args(argv)
    args.backend = pick_backend(args.backend)
    gpu = args.backend == "cuda"
    shard_bytes = (args.shard_mib or (64 if gpu else 4)) * MiB
    size = args.size_gib or (1 if gpu else 1 / 16)
    count = max(1, round(size * (1 << 30) / shard_bytes))
    readers = args.readers or (min(args.depth, 8) if gpu else 2)
    work = args.work if args.work >= 0 else (4 if gpu else 0)
    if args.depth < 1 or readers < 1 or readers > args.depth:
        parser.error("need 1 <= --readers <= --depth")
    skip = set(filter(None, args.skip.split(",")))

    ds = open_dataset(args.data, count, shard_bytes)
    print(
        f"{ds.count} shards x {shard_bytes / MiB:g} MiB = {ds.nbytes / GB:.2f} GB, "
        f"read ahead {args.depth} shards, {readers} readers, {work} matmuls per shard, "
        f"{'cold' if args.cold else 'warm'} page cache, device: {args.backend}",
        flush=True,
    )

    def make() -> Any:
        return make_device(gpu, ds, work)

    def cold() -> None:
        if args.cold:
            evict(ds)

    async def aiopinned_runs() -> list[Report]:
        async with PinnedPool(args.backend, max_bytes=args.depth * shard_bytes) as pool:
            await pinned_pipeline(ds, pool, make(), readers=readers)  # warm-up: pins the blocks
            cold()
            out = [await pinned_pipeline(ds, pool, make(), readers=readers)]
            if "reads" not in skip:
                cold()
                out.append(
                    await pinned_pipeline(
                        ds, pool, None, readers=readers, name="reads only (aiopinned)"
                    )
                )
            return out

    async def pageable_runs() -> list[Report]:
        buffers = [np.empty(shard_bytes, np.uint8) for _ in range(args.depth)]
        await pageable_pipeline(ds, buffers, make(), readers=readers)  # warm-up
        cold()
        return [await pageable_pipeline(ds, buffers, make(), readers=readers)]

    reports = anyio.run(aiopinned_runs)
    if "pageable" not in skip:
        reports += anyio.run(pageable_runs)
    if gpu and "dataloader" not in skip:
        reports.append(dataloader_epochs(ds, make, depth=args.depth, readers=readers))
    ceiling = copy_ceiling(shard_bytes) if gpu else math.nan

    base = reports[0]
    print(
        f"\n{'pipeline':<24} {'GB/s':>7} {'vs aiopinned':>12} {'seconds':>8} "
        f"{'compute busy':>12} {'compute idle':>12}"
    )
    for r in reports:
        busy = "-" if math.isnan(r.compute_busy_s) else f"{r.compute_busy_s:.3f} s"
        idle = "-" if math.isnan(r.compute_busy_s) else f"{r.compute_idle_s:.3f} s"
        print(
            f"{r.name:<24} {r.gbps:>7.2f} {r.gbps / base.gbps:>11.2f}x {r.seconds:>8.3f} "
            f"{busy:>12} {idle:>12}"
        )
    if gpu:
        print(
            f"{'pinned copy ceiling':<24} {ceiling:>7.2f} {ceiling / base.gbps:>11.2f}x "
            f"(one {shard_bytes / MiB:g} MiB torch-pinned buffer, copied over and over)"
        )
    print(
        f"every shard delivered once, in order, checksums verified; aiopinned read ahead "
        f"at most {base.peak_read_ahead} shards ({base.waits} reads waited for a buffer)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
