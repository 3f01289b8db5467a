"""An async prefetch pipeline: files read straight into pinned buffers, then copied to the device.

    python examples/prefetch_pipeline.py FILE [FILE ...] [--depth 8]
    python examples/prefetch_pipeline.py --demo          # 32 files of 4 MiB in a temp folder

A producer awaits a pool buffer for each file, in order, and reads the file into it in a worker
thread (``aiopinned.FileReader``: what the page cache holds is copied out of it, the rest read
``O_DIRECT`` straight into the pinned memory, no copy by the CPU).  The pool's cap (``--depth``
times the largest file) is how far the producer reads ahead: when every buffer is out,
``allocate`` waits.
A consumer queues each buffer's copy to the device on a stream, records the stream on the buffer
and frees it: the block comes back, and wakes the producer, once that copy has run.  The device
sums each file's bytes; the sums are printed (``SUM  FILE``), and the throughput to stderr.
``benchmarks/bench_prefetch.py`` measures this against pageable memory and
``DataLoader(pin_memory=True)``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
from _device import HostDevice, TorchDevice, open_device, pick_backend

from aiopinned import FileReader, PinnedBuffer, PinnedPool


def read_into(path: Path, memory: memoryview) -> None:
    """Read the whole file into ``memory``: what the page cache holds is copied out of it, the
    rest read ``O_DIRECT`` straight into the pinned buffer (pool blocks are page-aligned)."""
    with FileReader(path) as reader:
        reader.read_into(memory, 0)


async def pipeline(
    paths: list[Path], pool: PinnedPool, device: HostDevice | TorchDevice
) -> list[int]:
    """Every file's byte sum, computed on the device, in order."""
    stream = device.stream()
    send, receive = anyio.create_memory_object_stream[PinnedBuffer](len(paths))

    async def produce() -> None:
        async with send:
            for path in paths:
                buf = await pool.allocate(path.stat().st_size)  # waits while --depth are out
                await anyio.to_thread.run_sync(read_into, path, buf.memoryview())
                send.send_nowait(buf)

    sums = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(produce)
        async with receive:
            async for buf in receive:
                dev = device.to_device(stream, device.view(buf, "uint8", (buf.nbytes,)))
                buf.record_stream(stream)  # the block is reused only once this copy has run
                buf.free()
                sums.append(device.checksum(stream, dev))
    await pool.synchronize(stream)
    return [int(device.numpy(s)) for s in sums]


def make_demo_files(folder: Path, count: int = 32, nbytes: int = 4 << 20) -> list[Path]:
    paths = [folder / f"part-{i:03d}.bin" for i in range(count)]
    rng = np.random.default_rng(0)
    for path in paths:
        path.write_bytes(rng.bytes(nbytes))
    return paths


async def run(paths: list[Path], backend: str, depth: int) -> None:
    cap = max(depth * max(p.stat().st_size for p in paths), 1)
    async with PinnedPool(backend, max_bytes=cap) as pool:
        device = await anyio.to_thread.run_sync(open_device, pool.backend)
        t0 = time.perf_counter()
        sums = await pipeline(paths, pool, device)
        seconds = time.perf_counter() - t0
        for path, total in zip(paths, sums, strict=True):
            print(f"{total}  {path}")
        nbytes, s = sum(p.stat().st_size for p in paths), pool.stats()
        print(
            f"{len(paths)} files, {nbytes / 1e9:.3f} GB in {seconds:.3f} s "
            f"({nbytes / seconds / 1e9:.2f} GB/s) on {device.name}; pinned at most "
            f"{s.peak_reserved_bytes} of {cap} bytes, {s.num_waits} reads waited for a buffer",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--demo", action="store_true", help="make 32 files of 4 MiB and read them")
    parser.add_argument("--depth", type=int, default=8, help="files read ahead (the pool's cap)")
    parser.add_argument("--backend", choices=["auto", "cuda", "host"], default="auto")
    args = parser.parse_args(argv)
    if args.depth < 1 or bool(args.files) == args.demo:
        parser.error("give files, or --demo (not both), and --depth >= 1")
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"not files: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="aiopinned-demo-") as folder:
        paths = make_demo_files(Path(folder)) if args.demo else args.files
        anyio.run(run, paths, pick_backend(args.backend), args.depth)


if __name__ == "__main__":
    main()
