"""``python -m aiopinned bench``: the core figures on this machine, against torch where present.

Cache hit, pinning and releasing, copy bandwidth (CUDA with torch) and wake latency, each with
its peer measured in the same run.  ``--quick`` keeps it to seconds.  ``benchmarks/`` holds the
fuller comparisons.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from ._pool import PinnedPool
from .backends import HostStream

MiB = 1 << 20
Tick = Callable[[], None]


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    #: ours / the peer's (``None``: no peer here)
    ratio: float | None = None
    peer: str | None = None


@dataclass
class Report:
    backend: str
    rows: list[Row] = field(default_factory=list)
    #: wake latencies (µs) and pin times by size (bytes -> seconds), for ``--plot``
    wake_us: list[float] = field(default_factory=list)
    pin_s: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def step(title: str, total: int) -> Iterator[Callable[[], None]]:
    """One step of ``total`` units on stderr: a tqdm bar where tqdm is installed (the ``cli``
    extra), else a line with how long it took.  Yields the function that marks a unit done."""
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        print(f"  {title} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        yield lambda: None
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return
    with tqdm(total=total, desc=f"  {title}", file=sys.stderr, leave=True) as bar:
        yield lambda: bar.update(1)


def cuda_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


Sampler = Callable[[], "float | Awaitable[float]"]


def hit_samplers(pool: PinnedPool, size: int, n: int, torch: Any = None) -> dict[str, Sampler]:
    """Timers of ``n`` allocate + free pairs of ``size`` bytes (µs a pair): the pool's, awaited
    and ``allocate_nowait``, and torch's pinned ``empty`` where ``torch`` is given."""

    async def awaited() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            (await pool.allocate(size)).free()
        return (time.perf_counter() - t0) / n * 1e6

    def nowait() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            pool.allocate_nowait(size).free()
        return (time.perf_counter() - t0) / n * 1e6

    samplers: dict[str, Sampler] = {
        "await allocate + free": awaited,
        "allocate_nowait + free": nowait,
    }
    if torch is not None:

        def theirs() -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                del_me = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                del del_me
            return (time.perf_counter() - t0) / n * 1e6

        torch.empty(size, dtype=torch.uint8, pin_memory=True)  # (its cache, warm)
        samplers["torch.empty(pin_memory=True) + del"] = theirs
    return samplers


async def interleaved(
    samplers: dict[str, Sampler], rounds: int, tick: Tick = lambda: None
) -> dict[str, float]:
    """Each sampler's median over ``rounds`` rounds, every round taking one sample of each in
    turn (so that a machine's drift falls on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(rounds):
        for name, sample in samplers.items():
            result = sample()
            times[name].append(await result if inspect.isawaitable(result) else result)
        tick()
    return {name: statistics.median(v) for name, v in times.items()}


async def run(quick: bool) -> Report:
    hits, samples = (5000, 7) if quick else (20000, 11)
    pin_sizes = [16 * MiB, 64 * MiB, 256 * MiB] if quick else [64 * MiB, 256 * MiB, 1024 * MiB]
    async with PinnedPool() as pool:
        report = Report(pool.backend)
        torch = cuda_torch() if pool.backend == "cuda" else None
        with step(f"cache hit, {samples} x {hits}", samples) as tick:
            await _hits(pool, torch, hits, samples, report, tick)
        sizes = ", ".join(f"{s // MiB} MiB" for s in pin_sizes)
        with step(f"pinning and releasing {sizes}", len(pin_sizes)) as tick:
            await _pins(pool.backend, torch, pin_sizes, report, tick)
        if torch is not None:
            with step("copy bandwidth, 64 MiB", 2) as tick:
                await _copies(pool, torch, report, tick)
        rounds = 50 if quick else 300
        with step(f"wake latency, {rounds} rounds", rounds + 5) as tick:
            await _wake(torch, rounds, report, tick)
    return report


async def _hits(
    pool: PinnedPool, torch: Any, n: int, samples: int, report: Report, tick: Tick
) -> None:
    (await pool.allocate(MiB)).free()  # (the block, pinned)
    med = await interleaved(hit_samplers(pool, MiB, n, torch), samples, tick)
    peer = med.pop("torch.empty(pin_memory=True) + del", None)
    for name, us in med.items():
        ratio = us / peer if peer else None
        report.rows.append(
            Row("cache hit, 1 MiB", name, us, "us", ratio, "torch" if peer else None)
        )
    if peer:
        report.rows.append(Row("cache hit, 1 MiB", "torch.empty(pin_memory=True)", peer, "us"))


async def pool_pin_release(nbytes: int, backend: str, **options: Any) -> tuple[float, float]:
    """Seconds to pin ``nbytes`` fresh through a new pool, and to release them (``empty_cache``)."""
    async with PinnedPool(backend, **options) as fresh:
        t0 = time.perf_counter()
        buf = await fresh.allocate(nbytes)
        t1 = time.perf_counter()
        buf.free()
        await fresh.empty_cache()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def torch_pin_release(torch: Any, nbytes: int) -> tuple[float, float]:
    """The same through torch's pinned allocator: ``cudaHostAlloc``, then ``_host_emptyCache``."""
    torch._C._host_emptyCache()
    t0 = time.perf_counter()
    tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t1 = time.perf_counter()
    del tensor
    torch._C._host_emptyCache()
    return t1 - t0, time.perf_counter() - t1


async def _pins(backend: str, torch: Any, sizes: list[int], report: Report, tick: Tick) -> None:
    for size in sizes:
        pin, release = await pool_pin_release(size, backend)
        report.pin_s[size] = pin
        pin_peer, release_peer = torch_pin_release(torch, size) if torch else (None, None)
        section = f"pin and release, {size // MiB} MiB"
        for name, ours, theirs in (("pin", pin, pin_peer), ("release", release, release_peer)):
            ratio = ours / theirs if theirs else None
            report.rows.append(
                Row(section, name, ours * 1e3, "ms", ratio, "torch" if theirs else None)
            )
        tick()


def copy_gbps(torch: Any, host: Any, dev: Any, to_device: bool, reps: int) -> float:
    """GB/s of ``reps`` copies between a host tensor and a device tensor of the same size, timed
    with CUDA events on the current stream (after one copy to warm up)."""
    src, dst = (host, dev) if to_device else (dev, host)
    dst.copy_(src, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    return float(host.nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9)


async def _copies(pool: PinnedPool, torch: Any, report: Report, tick: Tick) -> None:
    """Both buffers warmed first (the device tensor's first copies pay for its pages), then
    the median of rounds that each time both in turn, so neither gets a cold or drifting GPU."""
    n, rounds = 64 * MiB, 5
    dev = torch.zeros(n, dtype=torch.uint8, device="cuda")
    ref = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    buf = await pool.allocate(n)
    ours = buf.torch()
    for to_device, name in ((True, "host->device"), (False, "device->host")):
        samplers: dict[str, Sampler] = {
            who: partial(copy_gbps, torch, host, dev, to_device, 10)
            for who, host in (("ours", ours), ("torch", ref))
        }
        for sample in samplers.values():  # (warm-up: untimed)
            sample()
        med = await interleaved(samplers, rounds)
        ratio = med["ours"] / med["torch"]
        report.rows.append(Row("copy, 64 MiB", name, med["ours"], "GB/s", ratio, "torch pinned"))
        tick()
    del ours
    buf.free()


async def _wake(torch: Any, rounds: int, report: Report, tick: Tick) -> None:
    """Copy end (or, on the host backend, the stream's own timestamp) to the waiter running."""
    async with PinnedPool("cuda" if torch is not None else "host", max_bytes=MiB) as pool:
        stream = torch.cuda.Stream() if torch is not None else HostStream()
        for i in range(rounds + 5):
            held = await pool.allocate(MiB)
            ended: list[float] = []
            if torch is not None:  # the end on the host clock: launch time + the GPU's own time
                start, done = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                stream.synchronize()
                with torch.cuda.stream(stream):
                    t_launch = time.perf_counter()
                    start.record()
                    torch.cuda._sleep(1_000_000)
                    done.record()
            else:
                stream.launch(time.sleep, 0.001)
                stream.launch(lambda stamps=ended: stamps.append(time.perf_counter()))
            held.record_stream(stream)
            held.free()
            (await pool.allocate(MiB)).free()  # waits for the block: the work above
            now = time.perf_counter()
            if torch is not None:
                done.synchronize()
                ended.append(t_launch + start.elapsed_time(done) / 1e3)
            if i >= 5:
                report.wake_us.append((now - ended[0]) * 1e6)
            tick()
    xs = sorted(report.wake_us)
    for name, v in (("median", statistics.median(xs)), ("p99", xs[int(0.99 * (len(xs) - 1))])):
        report.rows.append(Row("wake latency", name, v, "us"))


def render(report: Report) -> str:
    lines, section = [f"backend: {report.backend}"], None
    for row in report.rows:
        if row.section != section:
            section = row.section
            lines.append(f"\n{section}")
        ratio = f"{row.ratio:.2f}x of {row.peer}" if row.ratio is not None else ""
        lines.append(f"  {row.name:<32} {row.value:>10.2f} {row.unit:<5} {ratio}")
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot (drawing to files); ``ImportError`` saying what to install."""
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from None
    return plt


def plot(report: Report, path: str) -> None:
    plt = pyplot()
    fig, (wake, pin) = plt.subplots(1, 2, figsize=(10, 4))
    wake.hist(report.wake_us, bins=30)
    wake.set(title="wake latency", xlabel="µs from copy end to waiter", ylabel="rounds")
    sizes = sorted(report.pin_s)
    pin.plot([s / MiB for s in sizes], [report.pin_s[s] * 1e3 for s in sizes], marker="o")
    pin.set(title="pinning through the pool", xlabel="MiB", ylabel="ms")
    fig.tight_layout()
    fig.savefig(path)
