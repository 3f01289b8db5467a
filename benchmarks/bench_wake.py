"""Wake latency: from a copy finishing to the coroutine awaiting its block running again.

    python benchmarks/bench_wake.py [--backend auto|cuda|host] [--iters 300]

A capped pool holds one block.  Each round, a holder queues "work, then a copy from the block" on
a stream, records the stream on the block and frees it; a waiter is already awaiting
``pool.allocate`` for that block.  An observer timestamps the moment the copy completes (on CUDA a
second thread blocked in ``cudaEventSynchronize`` on an event recorded right after the copy; on
the host backend the stream itself, as its last act), and the waiter timestamps when it runs.

The peer, measured in the same run, is what an event loop does without aiopinned's watcher:
poll the event with ``asyncio.sleep(0.0001)`` (the loop's timers round that up to ~1 ms).
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
        """Queue work + copy; return a function that blocks until the copy ends, and says when."""
        torch, rt = self.torch, self.rt
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(int(delay_ms * self.cycles_per_ms))
            self.dev.copy_(buf_tensor, non_blocking=True)
        err, ev = rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming)
        assert err == rt.cudaError_t.cudaSuccess
        assert rt.cudaEventRecord(ev, self.stream.cuda_stream)[0] == rt.cudaError_t.cudaSuccess

        def observe() -> float:
            assert rt.cudaEventSynchronize(ev)[0] == rt.cudaError_t.cudaSuccess
            t = time.perf_counter()
            rt.cudaEventDestroy(ev)
            return t

        return observe

    def query_last(self) -> Callable[[], bool]:
        return self.stream.query


class _Host:
    def __init__(self) -> None:
        self.stream = HostStream()
        self._done = threading.Event()

    def queue_copy(self, buf_view: memoryview, delay_ms: float) -> Callable[[], float]:
        stamp: list[float] = []
        done = threading.Event()
        self.stream.launch(time.sleep, delay_ms / 1e3)
        self.stream.launch(bytes, buf_view)  # the "copy" reads the block
        self.stream.launch(lambda: (stamp.append(time.perf_counter()), done.set()))

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
    observed: list[float] = []
    observe = dev.queue_copy(view, delay_ms)
    observer = threading.Thread(target=lambda: observed.append(observe()))
    observer.start()
    del view
    if polling:  # the peer: no record_stream; poll the stream's state from the loop
        is_done = dev.query_last()
        buf.free()
        while not is_done():
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
    await asyncio.to_thread(observer.join)
    return (t_resume - observed[0]) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--delay-ms", type=float, default=2.0, help="GPU/stream work before the copy")
    args = parser.parse_args()
    async with PinnedPool(args.backend, max_bytes=BLOCK) as pool:
        dev: _Cuda | _Host = _Cuda() if pool.backend == "cuda" else _Host()
        ours: list[float] = []
        peer: list[float] = []
        for i in range(args.iters + 10):
            a = await one_round(pool, dev, args.delay_ms, polling=False)
            b = await one_round(pool, dev, args.delay_ms, polling=True)
            if i >= 10:  # warm-up
                ours.append(a)
                peer.append(b)
        print(f"backend: {pool.backend}; {args.iters} rounds, {args.delay_ms} ms of stream work "
              "before each copy")
        print(f"{'':44} {'median':>10} {'p99':>10} {'max':>10}")
        for name, xs in (("aiopinned: awaiting allocate (watcher)", ours),
                         ("peer: polling with asyncio.sleep(0.0001)", peer)):
            xs = sorted(xs)
            p99 = xs[min(len(xs) - 1, int(0.99 * len(xs)))]
            print(f"{name:44} {statistics.median(xs):8.1f}us {p99:8.1f}us {xs[-1]:8.1f}us")
        print(f"median ratio aiopinned / polling: {statistics.median(ours) / statistics.median(peer):.3f}")
        s = pool.stats()
        print(f"pool: {s.num_host_alloc} block pinned, reserved {s.reserved_bytes} of {s.max_bytes}")


if __name__ == "__main__":
    asyncio.run(main())
