"""Several GPUs at once: one pool per device, each feeding its own GPU, against torch pinned
memory on the same device in the same run.

    python benchmarks/bench_devices.py                   # every visible GPU, a process each
    python benchmarks/bench_devices.py --workers tasks   # one process, a task per GPU

Each worker opens ``PinnedPool(device=d, numa_node="auto")``, takes a block of ``--mib``, and
times host→device and device→host copies of it on its own stream (CUDA events; the worker awaits
``pool.synchronize``, so the tasks of one process share its loop), interleaved with the same
copies from a torch pinned tensor made with that device current.  All workers copy at the same
time (a barrier; the report gives how much their timed windows overlap).  It reports where each
buffer's pages are (``/proc/self/numa_maps``) against the device's node, and where the host has
more than one node, the bandwidth from a pool placed on a node that is not the device's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import time
from typing import Any

import anyio

from aiopinned import PinnedPool
from aiopinned.backends._numa import nodes, placement

MiB = 1 << 20
WORKER = {"processes": "process", "tasks": "task of one loop"}


def device_node(device: int) -> int | None:
    from aiopinned.backends._cudart import pci_bus_id
    from aiopinned.backends._numa import node_of_pci

    return node_of_pci(pci_bus_id(device))


def where(ptr: int) -> str:
    """``policy N0=100%``: the mapping's NUMA policy and its resident bytes by node."""
    found = placement(ptr)
    if found is None:
        return "no numa_maps"
    policy, by_node = found
    total = sum(by_node.values()) or 1
    return " ".join([policy, *(f"N{k}={v / total:.0%}" for k, v in sorted(by_node.items()))])


async def measure(device: int, mib: int, reps: int, start: Any) -> dict[str, Any]:
    """One worker: its pool's block and torch's tensor, copied to and from ``device``.
    ``start()`` is awaited once both are ready, so that every worker copies at once."""
    import torch

    n = mib * MiB
    node = device_node(device)
    far = [k for k in nodes() if node is not None and k != node][:1]
    async with contextlib.AsyncExitStack() as stack:
        pools = {"aiopinned": PinnedPool("cuda", device=device, numa_node="auto")}
        if far:
            pools[f"aiopinned, node {far[0]}"] = PinnedPool("cuda", device=device, numa_node=far[0])
        bufs = {}
        for name, p in pools.items():
            await stack.enter_async_context(p)
            bufs[name] = await p.allocate(n)
        pool = pools["aiopinned"]
        with torch.cuda.device(device):
            ref = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(n, dtype=torch.uint8, device=device)
            stream = torch.cuda.Stream(device=device)
        tensors = {name: buf.torch() for name, buf in bufs.items()} | {"torch": ref}
        report: dict[str, Any] = {
            "device": device,
            "device_node": node,
            "pages": {name: where(t.data_ptr()) for name, t in tensors.items()},
        }

        async def gbps(host: Any, to_device: bool) -> float:
            src, dst = (host, dev) if to_device else (dev, host)
            with torch.cuda.device(device), torch.cuda.stream(stream):
                t0, t1 = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                t0.record(stream)
                for _ in range(4):
                    dst.copy_(src, non_blocking=True)
                t1.record(stream)
            await pool.synchronize(stream)
            return 4 * n / (float(t0.elapsed_time(t1)) / 1e3) / 1e9

        for host in tensors.values():  # warm up
            await gbps(host, True)
        await start()
        samples: dict[tuple[str, bool], list[float]] = {}
        began = time.time()
        for r in range(reps):
            order = list(tensors.items())[:: 1 if r % 2 else -1]
            for to_device in (True, False):
                for name, host in order:
                    samples.setdefault((name, to_device), []).append(await gbps(host, to_device))
        report["window"] = (began, time.time())
        report["gbps"] = {
            f"{name} {'h2d' if h2d else 'd2h'}": statistics.median(v)
            for (name, h2d), v in samples.items()
        }
        del tensors
        for buf in bufs.values():
            buf.free()
    return report


def _process(device: int, mib: int, reps: int, barrier: Any, queue: Any) -> None:
    async def start() -> None:
        await anyio.to_thread.run_sync(barrier.wait)

    queue.put(asyncio.run(measure(device, mib, reps, start)))


def in_processes(devices: list[int], mib: int, reps: int) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(len(devices)), ctx.Queue()
    workers = [ctx.Process(target=_process, args=(d, mib, reps, barrier, queue)) for d in devices]
    for w in workers:
        w.start()
    reports = [queue.get(timeout=600) for _ in workers]
    for w in workers:
        w.join(60)
        if w.exitcode != 0:
            raise SystemExit(f"a worker failed (exit code {w.exitcode})")
    return sorted(reports, key=lambda r: r["device"])


async def in_tasks(devices: list[int], mib: int, reps: int) -> list[dict[str, Any]]:
    ready, go, reports = [0], anyio.Event(), []

    async def start() -> None:
        ready[0] += 1
        if ready[0] == len(devices):
            go.set()
        await go.wait()

    async def one(d: int) -> None:
        reports.append(await measure(d, mib, reps, start))

    async with anyio.create_task_group() as tg:
        for d in devices:
            tg.start_soon(one, d)
    return sorted(reports, key=lambda r: r["device"])


def overlap(reports: list[dict[str, Any]]) -> float:
    """The time every worker was copying, over the time any was."""
    starts = [float(r["window"][0]) for r in reports]
    ends = [float(r["window"][1]) for r in reports]
    return max(0.0, min(ends) - max(starts)) / (max(ends) - min(starts))


def render(reports: list[dict[str, Any]], workers: str, mib: int, reps: int) -> str:
    many = f"{len(reports)} GPUs at once, a {WORKER[workers]} each" if len(reports) > 1 else "1 GPU"
    lines = [
        f"{many}: {mib} MiB blocks, median of "
        f"{reps} samples of 4 copies; the workers' timed windows overlap {overlap(reports):.0%}"
    ]
    for r in reports:
        node = "none reported" if r["device_node"] is None else r["device_node"]
        lines.append(f"\ncuda:{r['device']} (NUMA node {node})")
        for name, pages in r["pages"].items():
            lines.append(f"  pages of {name:<22} {pages}")
        for direction, label in (("h2d", "host->device"), ("d2h", "device->host")):
            theirs = r["gbps"][f"torch {direction}"]
            for name in r["pages"]:
                ours = r["gbps"][f"{name} {direction}"]
                ratio = "1.00x" if name == "torch" else f"{ours / theirs:.2f}x of torch"
                lines.append(f"  {label}  {name:<22} {ours:6.1f} GB/s  {ratio}")
    if len(nodes()) == 1:
        lines.append("\none NUMA node on this host: placement on a far node cannot be measured")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", choices=("processes", "tasks"), default="processes")
    parser.add_argument("--mib", type=int, default=512, help="block size per device")
    parser.add_argument("--reps", type=int, default=7, help="samples per figure")
    parser.add_argument("--devices", type=int, nargs="*", help="default: every visible GPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("this benchmark needs torch")
    devices = args.devices if args.devices else list(range(torch.cuda.device_count()))
    if not devices:
        sys.exit("no CUDA device")
    if args.workers == "processes":
        reports = in_processes(devices, args.mib, args.reps)
    else:
        reports = asyncio.run(in_tasks(devices, args.mib, args.reps))
    print(json.dumps(reports) if args.json else render(reports, args.workers, args.mib, args.reps))


if __name__ == "__main__":
    main()
