"""Wake latency: from a copy finishing to the coroutine awaiting its block running again.

    python benchmarks/bench_wake.py [--backend auto|cuda|host] [--iters 300] [--busy 0,4]

A capped pool holds one block.  Each round, a holder queues "work, then a copy from the block" on
a stream, records the stream on the block and frees it; a waiter is already awaiting
``pool.allocate`` for that block.  The moment the copy completes is placed on the host clock (on
CUDA: host time at launch plus the GPU's elapsed time to the copy's end, from timing events; on the
host backend: the stream thread's own timestamp), and the waiter timestamps when it runs.

Measured in the same run, round by round:

* the peer: what an event loop does without aiopinned's watcher, polling the stream with
  ``asyncio.sleep(0.0001)`` (the loop's timers round that up to ~1 ms);
* the floor of any design that waits in a thread: a bare thread blocked on the copy's end wakes
  a coroutine through ``call_soon_threadsafe`` and a future, with no pool involved.

``--busy`` gives the numbers of busy tasks to run alongside (each does about 50 µs of Python
work, then yields), so the loop is never idle: a comma-separated list, one table each.  A busy
loop gives the GIL up at every iteration's ``select`` and takes it straight back, so a thread
that needs it can wait for seconds (CPython's GIL hands over only when a waiter's 5 ms
interval passes with no switch at all): there the watcher's poll timer, not its helper
threads, sees the copies end, and the floor row (5 rounds) shows what a thread alone gets.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable

from aiopinned import HostStream, PinnedPool

BLOCK = 1 << 20


class _Cuda:
    def __init__(self) -> None:
        import torch
        from cuda.bindings import runtime as rt

        self.torch, self.rt = torch, rt
        self.stream = torch.cuda.Stream()
        self.dev = torch.empty(BLOCK, dtype=torch.uint8, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        self.cycles_per_ms = 10_000_000 / start.elapsed_time(end)

    def queue_copy(self, buf_tensor: object, delay_ms: float) -> Callable[[], float]:
        """Queue work + copy; return a function that says (once done) when the copy ended.

        The end is placed on the host clock without any host thread watching it (a watching
        thread would need the GIL, and the loop under test holds it): the host time just before
        the stream starts, plus the GPU's own elapsed time from start to copy end (timing
        events).  The stream is idle when the round starts, so this errs late by the launch
        latency (a few µs): it can only understate the wake latency's improvement, not fake it.
        """
        torch = self.torch
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.synchronize()
        with torch.cuda.stream(self.stream):
            t_launch = time.perf_counter()
            start.record()
            torch.cuda._sleep(int(delay_ms * self.cycles_per_ms))
            self.dev.copy_(buf_tensor, non_blocking=True)
            done.record()

        def observe() -> float:
            done.synchronize()
            return t_launch + float(start.elapsed_time(done)) / 1e3

        return observe

    def query_last(self) -> Callable[[], bool]:
        query: Callable[[], bool] = self.stream.query
        return query

    def floor_us(self, delay_ms: float, n: int = 100) -> float:
        """The estimator's own floor: the same round, waited for by a blocking
        ``cudaEventSynchronize`` on this thread (no event loop, no other thread involved)."""
        xs = []
        for _ in range(n):
            observe = self.queue_copy(self.dev, delay_ms)
            done_at = observe()
            xs.append((time.perf_counter() - done_at) * 1e6)
        return statistics.median(xs)


class _Host:
    def __init__(self) -> None:
        self.stream = HostStream()
        self._done = threading.Event()

    def queue_copy(self, buf_view: memoryview, delay_ms: float) -> Callable[[], float]:
        stamp: list[float] = []
        done = threading.Event()
        self.stream.launch(time.sleep, delay_ms / 1e3)
        self.stream.launch(bytes, buf_view)  # the "copy" reads the block

        def stamp_it() -> None:
            stamp.append(time.perf_counter())
            done.set()

        self.stream.launch(stamp_it)

        def observe() -> float:
            done.wait()
            return stamp[0]

        self._done = done
        return observe

    def query_last(self) -> Callable[[], bool]:
        return self._done.is_set


async def one_round(pool: PinnedPool, dev: _Cuda | _Host, delay_ms: float, polling: bool) -> float:
    buf = await pool.allocate(BLOCK)
    view = buf.torch() if isinstance(dev, _Cuda) else buf.memoryview()
    observe = dev.queue_copy(view, delay_ms)
    del view  # the stream holds what it needs; a live view would hold the block back
    if polling:  # the peer: no record_stream; poll the stream's state from the loop
        is_done = dev.query_last()
        buf.free()
        # the peer polls, as a loop without aiopinned's watcher would
        while not is_done():  # noqa: ASYNC110
            await asyncio.sleep(0.0001)
        t_resume = time.perf_counter()
    else:
        resumed: list[float] = []

        async def waiter() -> None:
            again = await pool.allocate(BLOCK)
            resumed.append(time.perf_counter())  # the waiting coroutine runs again
            again.free()

        task = asyncio.ensure_future(waiter())
        await asyncio.sleep(0)  # the waiter is queued before the block is freed
        buf.record_stream(dev.stream)
        buf.free()
        await task
        t_resume = resumed[0]
    return (t_resume - observe()) * 1e6  # (the copy has ended by now: this returns at once)


async def floor_round(dev: _Cuda | _Host, source: object, delay_ms: float) -> float:
    """The bare cross-thread wake-up: a thread blocked on the copy's end, then a future."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[float] = loop.create_future()
    observe = dev.queue_copy(source, delay_ms)  # type: ignore[arg-type]
    threading.Thread(
        target=lambda: loop.call_soon_threadsafe(woken.set_result, observe()), daemon=True
    ).start()
    done_at = await woken
    return (time.perf_counter() - done_at) * 1e6


async def busy_task(stop: asyncio.Event) -> None:
    """About 50 µs of Python work between yields, until told to stop."""
    while not stop.is_set():
        t_end = time.perf_counter() + 50e-6
        while time.perf_counter() < t_end:
            pass
        await asyncio.sleep(0)


def _row(name: str, xs: list[float]) -> str:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
    return f"{name:44} {statistics.median(xs):8.1f}us {p99:8.1f}us {xs[-1]:8.1f}us"


async def measure(
    pool: PinnedPool, dev: _Cuda | _Host, args: argparse.Namespace, busy: int
) -> None:
    source: object = dev.dev if isinstance(dev, _Cuda) else memoryview(bytearray(BLOCK))
    stop = asyncio.Event()
    load = [asyncio.ensure_future(busy_task(stop)) for _ in range(busy)]
    rows: dict[str, list[float]] = {
        "aiopinned: awaiting allocate (watcher)": [],
        "peer: polling with asyncio.sleep(0.0001)": [],
        "floor: bare thread + call_soon_threadsafe": [],  # (5 rounds when busy)
    }
    samples = list(rows.values())
    rounds = args.busy_iters if busy else args.iters
    for i in range(rounds + 10):
        a = await one_round(pool, dev, args.delay_ms, polling=False)
        b = await one_round(pool, dev, args.delay_ms, polling=True)
        # Under load the bare thread waits seconds for the GIL (the busy loop keeps taking it
        # back): a few of those rounds make the point.
        c = await floor_round(dev, source, args.delay_ms) if not busy or i >= rounds + 5 else None
        if i >= 10:  # warm-up
            for xs, x in zip(samples, (a, b, c), strict=True):
                if x is not None:
                    xs.append(x)
    stop.set()
    await asyncio.gather(*load)
    print(f"\n{busy} busy tasks on the loop")
    print(f"{'':44} {'median':>10} {'p99':>10} {'max':>10}")
    for name, xs in rows.items():
        print(_row(name, xs))
    ours, peer, floor = (statistics.median(xs) for xs in samples)
    print(f"median ratios: aiopinned / polling {ours / peer:.3f}, / floor {ours / floor:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument(
        "--delay-ms", type=float, default=2.0, help="GPU/stream work before the copy"
    )
    parser.add_argument("--spin-s", type=float, default=0.0, help="PinnedPool(spin_s=...)")
    parser.add_argument("--busy", default="0,4", help="busy tasks alongside, e.g. 0,4")
    parser.add_argument(
        "--busy-iters",
        type=int,
        default=100,
        help="rounds with busy tasks (each waits for the GIL)",
    )
    args = parser.parse_args()
    async with PinnedPool(args.backend, max_bytes=BLOCK, spin_s=args.spin_s) as pool:
        dev: _Cuda | _Host = _Cuda() if pool.backend == "cuda" else _Host()
        print(
            f"backend: {pool.backend}; {args.iters} rounds, {args.delay_ms} ms of stream work "
            f"before each copy; spin_s={args.spin_s}"
        )
        if isinstance(dev, _Cuda):
            print(
                f"floor of the timing method (blocking cudaEventSynchronize, no loop): "
                f"{dev.floor_us(args.delay_ms):.1f}us median"
            )
        for busy in (int(b) for b in args.busy.split(",")):
            await measure(pool, dev, args, busy)
        s = pool.stats()
        print(
            f"pool: {s.num_host_alloc} block pinned, reserved {s.reserved_bytes} of {s.max_bytes}"
        )


if __name__ == "__main__":
    asyncio.run(main())
