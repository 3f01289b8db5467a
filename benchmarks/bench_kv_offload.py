"""A host KV-cache tier as a real workload: many pages per call, and the time to first token.

    python benchmarks/bench_kv_offload.py             # GPU when torch sees one, else host
    python benchmarks/bench_kv_offload.py --requests 400 --prefixes 300 --gpu-prefixes 48

**Bandwidth.**  Swap-in (host to device) and swap-out (device to host) of batches of KV pages
(``--batch``, 256 by default) of 64 KiB, 256 KiB and 2 MiB, scattered over a tier
(``PinnedPages``) and over the device's page store: one ``cudaMemcpyAsync`` per page
(``loop``), one ``cudaMemcpyBatchAsync`` (``batch``), and a gather/scatter kernel that reads
or writes the host pages over UVA (``kernel``, CuPy), against the copy ceiling of one large
pinned buffer measured in the same run.  Each figure is bytes over the wall time of
``--rounds`` batches queued back to back, so the cost of queuing counts.

**Serving.**  A paged KV cache on the device holds ``--gpu-prefixes`` prefixes; requests arrive
at random (a Poisson stream) with prefixes drawn from a Zipf distribution over ``--prefixes``
(more than the device holds).  A request whose prefix is on the device runs at once; one whose
prefix is in the host tier swaps its pages in first (one batch); a miss computes the prefill (a
matmul sized like a prefill of the prefix's tokens through a ``--params-b`` model).  Pages
evicted from the device are swapped out behind the requests (another stream), and the host tier
evicts the least recently used.  Each request then prefills its own new tokens, its first
token.  Reported: the time to first token (p50, p99) of each kind of request, with the tier and
without it (recompute only), on the same arrivals; and the loop's longest stall.
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from aiopinned import HostStream, PinnedPages, PinnedPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from _device import cuda_usable

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE_SIZES = (64 * KiB, 256 * KiB, 2 * MiB)


# -- the device: torch on a GPU, or NumPy on HostStreams -----------------------------------------
class HostKv:
    """The host backend's stand-in: pages in a NumPy array, work on ``HostStream``s."""

    name = "host (numpy; no bus is crossed: code paths only)"

    def __init__(self, slots: int, page: int, hidden: int, width: int) -> None:
        self.store = np.zeros((slots, page), dtype=np.uint8)
        self.base, self.page = self.store.ctypes.data, page
        self.compute, self.copy = HostStream("kv-compute"), HostStream("kv-copy")
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal((hidden, width)).astype(np.float32)
        self.hidden = hidden

    def ptrs(self, slots: np.ndarray) -> np.ndarray:
        return self.base + slots.astype(np.int64) * self.page

    def after(self, first: Any, then: Any) -> None:
        """Work queued on ``then`` from now on waits for what is queued on ``first``."""
        done = threading.Event()
        first.launch(done.set)
        then.launch(done.wait)

    def prefill(self, tokens: int, layers: int) -> None:
        x = np.ones((tokens, self.hidden), dtype=np.float32)
        self.compute.launch(_layers, x, self.weight, layers)

    def write(self, slots: np.ndarray, value: int) -> None:
        self.compute.launch(self.store.__setitem__, slots, value)

    def timer(self, stream: Any) -> Callable[[], float]:
        stream.synchronize()
        t0 = time.perf_counter()

        def stop() -> float:
            stream.synchronize()
            return time.perf_counter() - t0

        return stop


def _layers(x: np.ndarray, w: np.ndarray, layers: int) -> None:
    for _ in range(layers):
        (x @ w)[:, : x.shape[1]]


class TorchKv:
    """Pages in one device tensor; a compute stream and a copy stream."""

    def __init__(self, slots: int, page: int, hidden: int, width: int) -> None:
        import torch

        self.torch = torch
        self.store = torch.zeros((slots, page), dtype=torch.uint8, device="cuda")
        self.base, self.page = self.store.data_ptr(), page
        self.compute, self.copy = torch.cuda.Stream(), torch.cuda.Stream()
        self.weight = torch.randn((hidden, width), dtype=torch.bfloat16, device="cuda")
        self.hidden = hidden
        self.name = f"{torch.cuda.get_device_name()} (torch {torch.__version__})"

    def ptrs(self, slots: np.ndarray) -> np.ndarray:
        ptrs: np.ndarray = self.base + slots.astype(np.int64) * self.page
        return ptrs

    def after(self, first: Any, then: Any) -> None:
        event = self.torch.cuda.Event()
        event.record(first)
        then.wait_event(event)

    def prefill(self, tokens: int, layers: int) -> None:
        torch = self.torch
        with torch.cuda.stream(self.compute):
            x = torch.ones((tokens, self.hidden), dtype=torch.bfloat16, device="cuda")
            for _ in range(layers):
                x = (x @ self.weight)[:, : self.hidden]

    def write(self, slots: np.ndarray, value: int) -> None:
        with self.torch.cuda.stream(self.compute):
            index = self.torch.from_numpy(slots).to("cuda", non_blocking=True)
            self.store[index] = value

    def timer(self, stream: Any) -> Callable[[], float]:
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(
            enable_timing=True)  # fmt: skip
        stream.synchronize()
        t0 = time.perf_counter()
        start.record(stream)

        def stop() -> float:
            end.record(stream)
            end.synchronize()
            return time.perf_counter() - t0  # (wall time: the queuing counts)

        return stop


# -- bandwidth ------------------------------------------------------------------------------------
KERNEL = r"""
extern "C" __global__ void copy_pages(const unsigned long long* dst, const unsigned long long* src,
                                      long long words) {
    uint4* d = (uint4*)dst[blockIdx.x];
    const uint4* s = (const uint4*)src[blockIdx.x];
    for (long long i = threadIdx.x; i < words; i += blockDim.x) d[i] = s[i];
}
"""


class Kernel:
    """The gather/scatter kernel (CuPy): one thread block per page, 16-byte words, reading or
    writing host pages through their device addresses (``cudaHostGetDevicePointer``)."""

    def __init__(self, pages: PinnedPages) -> None:
        import cupy

        from aiopinned.backends._cudart import check, rt

        self.cupy = cupy
        self.fn = cupy.RawKernel(KERNEL, "copy_pages")
        self.host = np.array([int(check(rt.cudaHostGetDevicePointer(int(p), 0),
                                        "cudaHostGetDevicePointer")) for p in pages.ptrs],
                             dtype=np.uint64)  # fmt: skip

    def run(self, dsts: np.ndarray, srcs: np.ndarray, page: int, stream: Any) -> None:
        cp = self.cupy
        with cp.cuda.ExternalStream(stream.cuda_stream):
            d, s = cp.asarray(dsts.astype(np.uint64)), cp.asarray(srcs.astype(np.uint64))
            self.fn((len(dsts),), (256,), (d, s, np.int64(page // 16)))


def gbps(kv: Any, nbytes: int, rounds: int, queue: Callable[[int], object]) -> float:
    """GB/s of ``queue(r)`` (``nbytes`` each) on the copy stream: one round to warm up, then
    ``rounds`` back to back, timed by wall clock (so that queuing counts)."""
    queue(0)
    stop = kv.timer(kv.copy)
    for r in range(1, rounds + 1):
        queue(r)
    return float(nbytes * rounds / stop() / 1e9)


def bandwidth(kv: Any, pages: PinnedPages, page: int, args: argparse.Namespace,
              kernel: Kernel | None) -> dict[str, float]:  # fmt: skip
    """GB/s of each method, both ways, for batches of ``args.batch`` scattered pages (drawn
    before the clock starts)."""
    rng, n = np.random.default_rng(1), args.batch
    picks = [(rng.permutation(pages.count)[:n], kv.ptrs(rng.permutation(len(kv.store))[:n]))
             for _ in range(args.rounds + 1)]  # fmt: skip
    methods = ("loop", "batch") if kernel is None else ("loop", "batch", "kernel")
    return {
        f"{name} {way}": gbps(kv, n * page, args.rounds,
                              partial(_queue, pages, kernel, name, way == "in", picks, kv.copy))
        for name in methods
        for way in ("in", "out")
    }  # fmt: skip


def _queue(pages: PinnedPages, kernel: Kernel | None, name: str, to_device: bool,
           picks: list[tuple[np.ndarray, np.ndarray]], stream: Any, r: int) -> None:  # fmt: skip
    """Round ``r``'s batch by ``name`` (``loop``, ``batch``, ``kernel``), one way."""
    idx, dev = picks[r]
    if name == "kernel":
        assert kernel is not None
        host = kernel.host[idx].astype(np.int64)
        dsts, srcs = (dev, host) if to_device else (host, dev)
        kernel.run(dsts, srcs, pages.page_bytes, stream)
    elif to_device:
        pages.to_device(idx, dev, stream, method=name)
    else:
        pages.from_device(dev, idx, stream, method=name)


async def ceilings(kv: Any, pool: PinnedPool, nbytes: int, rounds: int) -> tuple[float, float]:
    """GB/s of one large pinned buffer to the device and back (the same stream and timing)."""
    slot = kv.ptrs(np.array([0]))
    with PinnedPages(pool, [await pool.allocate(nbytes)]) as host:
        up = gbps(kv, nbytes, rounds, lambda r: host.to_device([0], slot, kv.copy, method="loop"))
        down = gbps(kv, nbytes, rounds,
                    lambda r: host.from_device(slot, [0], kv.copy, method="loop"))  # fmt: skip
    return up, down


# -- serving ---------------------------------------------------------------------------------------
class Lru:
    """Prefixes -> the slots (device) or pages (host) holding them, least recently used first,
    over a fixed number of slots."""

    def __init__(self, slots: int) -> None:
        self.free = list(range(slots))
        self.held: OrderedDict[int, np.ndarray] = OrderedDict()

    def __contains__(self, prefix: int) -> bool:
        return prefix in self.held

    def touch(self, prefix: int) -> np.ndarray:
        self.held.move_to_end(prefix)
        return self.held[prefix]

    def take(self, prefix: int, n: int, evicted: Callable[[int, np.ndarray], None]) -> np.ndarray:
        """``n`` slots for ``prefix``, evicting the least recently used (``evicted(prefix,
        slots)`` is told of each before its slots are reused)."""
        while len(self.free) < n:
            old, slots = self.held.popitem(last=False)
            evicted(old, slots)
            self.free.extend(slots.tolist())
        got = np.array(self.free[-n:], dtype=np.int64)
        del self.free[-n:]
        self.held[prefix] = got
        return got


class Engine:
    """One device serving requests one after another, with a host tier or without."""

    def __init__(self, kv: Any, pool: PinnedPool, pages: PinnedPages | None,
                 args: argparse.Namespace) -> None:  # fmt: skip
        self.kv, self.pool, self.pages, self.args = kv, pool, pages, args
        self.per = args.pages_per_prefix
        self.gpu = Lru(args.gpu_prefixes * self.per)
        self.host = Lru(pages.count) if pages is not None else None
        self.swapped_in = self.swapped_out = 0

    def _evict_from_gpu(self, prefix: int, slots: np.ndarray) -> None:
        """Swap an evicted prefix out to the host tier, behind the requests (the copy stream
        waits for the compute that wrote it; what reuses its slots waits for the copy)."""
        host, kv = self.host, self.kv
        if host is None or prefix in host:
            return
        assert self.pages is not None
        kv.after(kv.compute, kv.copy)
        where = host.take(prefix, self.per, lambda *_: None)
        self.pages.from_device(kv.ptrs(slots), where, kv.copy)
        self.swapped_out += self.per

    async def serve(self, prefix: int) -> str:
        """One request; what kind it was (``device``, ``host``, ``miss``)."""
        kv, args = self.kv, self.args
        if prefix in self.gpu:
            self.gpu.touch(prefix)
            kind = "device"
        else:
            slots = self.gpu.take(prefix, self.per, self._evict_from_gpu)
            kv.after(kv.copy, kv.compute)  # (slots freed by a swap-out: reused after it)
            if self.host is not None and prefix in self.host:
                assert self.pages is not None
                self.pages.to_device(self.host.touch(prefix), kv.ptrs(slots), kv.copy)
                kv.after(kv.copy, kv.compute)
                self.swapped_in += self.per
                kind = "host"
            else:
                kv.prefill(args.prefix_tokens, args.layers)
                kv.write(slots, prefix % 251)
                kind = "miss"
        kv.prefill(args.new_tokens, args.layers)  # the request's own tokens: its first token
        await self.pool.synchronize(kv.compute)
        return kind


async def run_requests(engine: Engine, arrivals: Sequence[tuple[float, int]]) -> dict[str, Any]:
    """Serve ``arrivals`` (seconds from the start, prefix) in order as they come; each
    request's time to first token by kind, and the loop's longest stall meanwhile."""
    ttft: dict[str, list[float]] = {"device": [], "host": [], "miss": []}
    stall = 0.0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal stall
        while not done.is_set():
            t0 = time.perf_counter()
            await anyio.sleep(0.001)
            stall = max(stall, time.perf_counter() - t0 - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        start = time.perf_counter()
        for at, prefix in arrivals:
            wait = start + at - time.perf_counter()
            if wait > 0:
                await anyio.sleep(wait)
            kind = await engine.serve(prefix)
            ttft[kind].append((time.perf_counter() - (start + at)) * 1e3)
        done.set()
    return {"ttft": ttft, "stall_ms": stall * 1e3}


def make_arrivals(args: argparse.Namespace, service_s: float) -> list[tuple[float, int]]:
    """Poisson arrivals at ``args.load`` of what recompute alone could serve, prefixes by Zipf."""
    rng = np.random.default_rng(2)
    weights = 1.0 / np.arange(1, args.prefixes + 1) ** args.zipf
    prefixes = rng.choice(args.prefixes, size=args.requests, p=weights / weights.sum())
    gaps = rng.exponential(service_s / args.load, size=args.requests)
    return list(zip(np.cumsum(gaps).tolist(), prefixes.tolist(), strict=True))


async def bench(args: argparse.Namespace) -> None:
    backend = "cuda" if args.backend == "auto" and cuda_usable() else (
        "host" if args.backend == "auto" else args.backend)  # fmt: skip
    make = TorchKv if backend == "cuda" else HostKv
    say: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: E731
    async with PinnedPool(backend) as pool:
        say(f"device: {'cuda' if backend == 'cuda' else 'host backend'}")
        rows = []
        for page in (int(p) * KiB for p in args.page_kib.split(",")):
            kv = make(max(2 * args.batch, 8), page, args.hidden, args.width)
            pages = await PinnedPages.allocate(pool, 2 * args.batch, page)
            kernel = None
            if backend == "cuda" and not args.no_kernel:
                try:
                    kernel = Kernel(pages)
                except Exception as exc:  # (no CuPy, or the pages have no device address)
                    say(f"  kernel: not run ({type(exc).__name__}: {exc})")
            got = bandwidth(kv, pages, page, args, kernel)
            up, down = await ceilings(kv, pool, args.batch * page, args.rounds)
            pages.free()
            rows.append((page, got, up, down))
            say(f"  {page // KiB} KiB pages: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items())
                + f" GB/s; ceiling {up:.1f} / {down:.1f} GB/s")  # fmt: skip
            del kv
        print_bandwidth(rows, args.batch)

        kv = make(args.gpu_prefixes * args.pages_per_prefix, args.page_kib_serve * KiB,
                  args.hidden, args.width)  # fmt: skip
        kv.prefill(args.prefix_tokens, args.layers)  # (warm-up: the first is slower)
        t0 = kv.timer(kv.compute)
        kv.prefill(args.prefix_tokens, args.layers)
        prefill_s = t0()
        arrivals = make_arrivals(args, prefill_s)
        say(f"\nserving: a prefill of {args.prefix_tokens} tokens takes {prefill_s * 1e3:.2f} ms; "
            f"{args.requests} requests at {args.load:.2f} of that rate, {args.prefixes} prefixes "
            f"(Zipf {args.zipf}), {args.gpu_prefixes} fit on the device, "
            f"{args.pages_per_prefix} pages of {args.page_kib_serve} KiB each")  # fmt: skip
        runs = {}
        for tier in (True, False):
            held: PinnedPages | None = None
            if tier:
                held = await PinnedPages.allocate(
                    pool, args.prefixes * args.pages_per_prefix, args.page_kib_serve * KiB
                )
                gc.freeze()  # (the README's advice for a tier of many pages: see "Memory")
            engine = Engine(kv, pool, held, args)
            runs[tier] = await run_requests(engine, arrivals)
            runs[tier]["swaps"] = (engine.swapped_in, engine.swapped_out)
            if held is not None:
                gc.unfreeze()
                held.free()
                await pool.synchronize(kv.copy)
                await pool.empty_cache()
        print_serving(runs)


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def print_bandwidth(rows: list[tuple[int, dict[str, float], float, float]], batch: int) -> None:
    print(
        f"\nbatches of {batch} scattered pages, GB/s (x the copy ceiling of one pinned buffer "
        "in the same run)"
    )
    names = list(rows[0][1])
    print(f"{'page':>9} " + " ".join(f"{n:>17}" for n in names) + f" {'ceiling in/out':>15}")
    for page, got, up, down in rows:
        cells = " ".join(
            f"{v:>9.1f} ({v / (up if k.endswith('in') else down):.2f}x)" for k, v in got.items()
        )
        print(f"{page // KiB:>5} KiB {cells} {up:>7.1f}/{down:.1f}")


def print_serving(runs: dict[bool, dict[str, Any]]) -> None:
    print(f"\n{'time to first token, ms':>30} {'p50':>9} {'p99':>9} {'requests':>9}")
    for tier, run in runs.items():
        for kind, values in run["ttft"].items():
            if values:
                label = f"{'with tier' if tier else 'recompute'}: {kind}"
                print(f"{label:>30} {pct(values, 50):>9} {pct(values, 99):>9} {len(values):>9}")
    for tier, run in runs.items():
        swapped_in, swapped_out = run["swaps"]
        print(
            f"{'with tier' if tier else 'recompute'}: loop's longest stall "
            f"{run['stall_ms']:.2f} ms; pages swapped in {swapped_in}, out {swapped_out}"
        )
    host, miss = runs[True]["ttft"]["host"], runs[False]["ttft"]["miss"]
    if host and miss:
        print(
            f"a prefix from the host tier against recomputing one: p50 "
            f"{np.percentile(host, 50) / np.percentile(miss, 50):.2f}x, p99 "
            f"{np.percentile(host, 99) / np.percentile(miss, 99):.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("auto", "cuda", "host"), default="auto")
    parser.add_argument("--page-kib", default="64,256,2048", help="bandwidth rows' page sizes")
    parser.add_argument("--batch", type=int, default=256, help="pages per batch")
    parser.add_argument("--rounds", type=int, default=20, help="batches timed per figure")
    parser.add_argument("--no-kernel", action="store_true", help="skip the CuPy kernel rows")
    parser.add_argument("--page-kib-serve", type=int, default=64, help="the KV page (KiB)")
    parser.add_argument(
        "--pages-per-prefix",
        type=int,
        default=1024,
        help="pages of one prefix (512 tokens x 32 layers / 16 per page)",
    )
    parser.add_argument("--prefix-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32, help="each request's own")
    parser.add_argument("--prefixes", type=int, default=300)
    parser.add_argument("--gpu-prefixes", type=int, default=48)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="arrival rate, as a fraction of one prefill per its time",
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--width", type=int, default=14336 * 3,
                        help="the prefill's matmul width (with --hidden and --layers: about 8B "
                        "parameters)")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.batch, args.rounds, args.requests, args.prefixes, args.gpu_prefixes) < 1:
        parser.error("--batch, --rounds, --requests, --prefixes, --gpu-prefixes must be >= 1")
    anyio.run(bench, args)


if __name__ == "__main__":
    main()
