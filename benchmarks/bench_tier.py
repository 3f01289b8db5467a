"""Pinned tiers: bringing up S GiB by each method, carving a tier into pages, and serving while a
tier comes up.

    python benchmarks/bench_tier.py                      # 64 GiB; 20.4, 40 and 60 GiB too
    python benchmarks/bench_tier.py --gib 4 --sizes 1.3 --serve-gib 4      # a quick look

**Bring-up.**  Each method pins in a process of its own (torch reads its allocator options once
per process, and each starts with nothing pinned); only the pinning is timed (CUDA is started
first), and the process unpins before it exits:

* ``aiopinned``: ``PinnedPool.reserve(n, block_bytes=2 MiB)``, segments of 1 GiB carved into pages;
* ``torch``: ``torch.empty(n, dtype=torch.uint8, pin_memory=True)`` (its caching host allocator,
  ``cudaHostAlloc`` of the next power of two);
* ``torch-register``: the same with ``PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,
  pinned_num_register_threads:8`` (``mmap``, touch threads, ``cudaHostRegister``);
* ``vllm``: vLLM's CPU-offload method written out: an anonymous ``mmap``,
  ``madvise(MADV_POPULATE_WRITE)``, one ``cudaHostRegister`` per 64 GiB.

Pinned bytes come from each allocator's own count (torch's ``host_memory_stats``).  Without
CUDA the torch rows are skipped and the others run on the host backend, without registration.

**Carving.**  A tier of 2 MiB pages by ``reserve``'s segments, against one pinning per page
(``segment_bytes`` = the page), and the time per GiB at several ``segment_bytes`` (the default,
1 GiB, is chosen from these).

**Serving during bring-up.**  The example server (``examples/inference_server.py``) answers a
probe process's small requests (its own process, so that the client does not share the server's
CPU time), while a tier comes up: aiopinned's in the server process itself (``--tier-gib``,
``start_reserve``), every other method in a process beside it (in the server's process it would
stop the loop for its whole duration: pinning holds the calling thread).  The probe's p99 while
the tier comes up is set against its p99 outside that window, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from aiopinned import PinnedPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_server  # (its server process, payloads and answer checks)

GiB, MiB = 1 << 30, 1 << 20
METHODS = ("aiopinned", "torch", "torch-register", "vllm")
TORCH_REGISTER = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
MADV_POPULATE_WRITE = 23  # (Linux 5.14; not in Python's mmap module before 3.13)
VLLM_CHUNK = 64 << 30


def cuda_usable() -> bool:
    from aiopinned.backends._cudart import cuda_unusable_reason

    return cuda_unusable_reason() is None


# -- one bring-up, in its own process -------------------------------------------------------------
def bring_up(
    method: str, nbytes: int, page: int, threads: int | None, segment: int
) -> dict[str, Any]:
    """Pin ``nbytes`` by ``method``; the seconds it took, the bytes pinned, the pinning calls,
    and when it started and ended (``time.monotonic()``, comparable across processes)."""
    return {"aiopinned": _aiopinned, "torch": _torch, "torch-register": _torch,
            "vllm": _vllm}[method](nbytes, page, threads, segment)  # fmt: skip


def _aiopinned(nbytes: int, page: int, threads: int | None, segment: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with PinnedPool(pin_threads=threads, segment_bytes=segment) as pool:
            started, t0 = time.monotonic(), time.perf_counter()
            await pool.reserve(nbytes, block_bytes=page)
            seconds, ended = time.perf_counter() - t0, time.monotonic()
            s = pool.stats()
            return {"seconds": seconds, "pinned": s.reserved_bytes, "calls": s.num_host_alloc,
                    "started": started, "ended": ended, "backend": pool.backend}  # fmt: skip

    return anyio.run(run)


def _torch(nbytes: int, page: int, threads: int | None, segment: int) -> dict[str, Any]:
    import torch

    torch.cuda.init()
    torch.cuda.synchronize()
    started, t0 = time.monotonic(), time.perf_counter()
    tier = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    seconds, ended = time.perf_counter() - t0, time.monotonic()
    assert tier.is_pinned()
    stats = torch.cuda.host_memory_stats()
    return {"seconds": seconds, "pinned": stats["allocated_bytes.current"],
            "calls": stats["num_host_alloc"], "started": started, "ended": ended,
            "backend": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or "cudaHostAlloc"}  # fmt: skip


def _vllm(nbytes: int, page: int, threads: int | None, segment: int) -> dict[str, Any]:
    from aiopinned.backends._cudart import check, rt

    cuda = cuda_usable()
    if cuda:
        check(rt.cudaFree(0), "cudaFree(0)")  # (the context, before the clock starts)
    libc = ctypes.CDLL(None, use_errno=True)
    started, t0 = time.monotonic(), time.perf_counter()
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(region)
    ptr = ctypes.addressof(anchor)
    if libc.madvise(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE) failed")
    chunks = list(range(ptr, ptr + nbytes, VLLM_CHUNK))
    for at in chunks if cuda else []:
        size = min(VLLM_CHUNK, ptr + nbytes - at)
        check(rt.cudaHostRegister(at, size, rt.cudaHostRegisterDefault), "cudaHostRegister")
    seconds, ended = time.perf_counter() - t0, time.monotonic()
    for at in chunks if cuda else []:
        check(rt.cudaHostUnregister(at), "cudaHostUnregister")
    del anchor
    region.close()
    return {"seconds": seconds, "pinned": nbytes, "calls": len(chunks), "started": started,
            "ended": ended, "backend": "cuda" if cuda else "host (no registration)"}  # fmt: skip


def run_bring_up(
    method: str, nbytes: int, args: argparse.Namespace, segment: int = 1 << 30,
    threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``bring_up`` in a fresh process; its JSON."""
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if method == "torch-register":
        env["PYTORCH_CUDA_ALLOC_CONF"] = TORCH_REGISTER
    argv = [sys.executable, __file__, "bringup", "--method", method, "--bytes", str(nbytes),
            "--page-kib", str(args.page_kib), "--segment-bytes", str(segment)]  # fmt: skip
    if threads or args.pin_threads:
        argv += ["--pin-threads", str(threads or args.pin_threads)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} bring-up of {nbytes} bytes failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- the probe: small requests, timed, until told to stop ------------------------------------------
def probe_process(args: argparse.Namespace) -> None:
    import httpx

    async def run() -> list[tuple[float, float]]:
        payloads = bench_server.load_payloads(args.payloads)
        done: list[tuple[float, float]] = []
        stop = anyio.Event()

        async def one() -> None:
            async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
                i = 0
                while not stop.is_set():
                    body, expected = payloads[i % len(payloads)]
                    sent, t0 = time.monotonic(), time.perf_counter()
                    kind = {"content-type": bench_server.OCTETS}
                    r = await client.post("/infer", content=body, headers=kind)
                    ms = (time.perf_counter() - t0) * 1e3
                    r.raise_for_status()
                    bench_server.check_answer(r.content, expected)
                    done.append((sent, ms))
                    i += 1

        async def until_stop() -> None:
            print("ready", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            stop.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(until_stop)
            for _ in range(args.concurrency):
                tg.start_soon(one)
        return done

    print(json.dumps(anyio.run(run)), flush=True)


class Probe:
    """A probe process against ``url``: ``stop()`` gives its (sent, ms) pairs."""

    def __init__(self, url: str, payloads: str, concurrency: int) -> None:
        argv = [sys.executable, __file__, "probe", "--url", url, "--payloads", payloads,
                "--concurrency", str(concurrency)]  # fmt: skip
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(argv, stdin=pipe, stdout=pipe, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.started = time.monotonic()

    def stop(self) -> list[tuple[float, float]]:
        out, _ = self.proc.communicate("stop\n", timeout=600)
        if self.proc.returncode != 0:
            raise RuntimeError("the probe failed")
        return [(float(t), float(ms)) for t, ms in json.loads(out.strip().splitlines()[-1])]


def p99_inside_and_out(
    samples: Sequence[tuple[float, float]], window: tuple[float, float], warm_until: float
) -> tuple[float, float, int, int]:
    """p99 (ms) of the requests sent inside ``window``, and of those sent outside it (after
    ``warm_until``, and not within 0.2 s of it); how many of each."""
    lo, hi = window
    inside = [ms for t, ms in samples if lo <= t <= hi]
    outside = [ms for t, ms in samples if t >= warm_until and (t < lo - 0.2 or t > hi + 0.2)]
    if not inside or not outside:
        raise RuntimeError(f"too few requests: {len(inside)} inside, {len(outside)} outside")
    return (float(np.percentile(inside, 99)), float(np.percentile(outside, 99)), len(inside),
            len(outside))  # fmt: skip


async def serve_during(method: str, args: argparse.Namespace, payloads: str) -> dict[str, Any]:
    """The probe's p99 against the example server while ``method`` brings up its tier."""
    import httpx

    nbytes = int(args.serve_gib * GiB)
    argv = ["--backend", "auto", "--dims", args.dims, "--streams", "4", "--max-mib", "16"]
    warm = args.warm_s
    if method == "aiopinned":
        argv += ["--tier-gib", str(args.serve_gib), "--tier-page-kib", str(args.page_kib),
                 "--tier-after-s", str(warm + 1)]  # fmt: skip
        if args.serve_pin_threads:
            argv += ["--pin-threads", str(args.serve_pin_threads)]
    async with (
        bench_server.server_process("pinned", argv) as running,
        httpx.AsyncClient(base_url=running.url) as client,
    ):
        probe = await anyio.to_thread.run_sync(Probe, running.url, payloads, args.concurrency)
        try:
            if method == "aiopinned":
                while (await client.get("/health")).status_code != 200:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # (the server's own readiness, as a balancer polls)
                tier = (await client.get("/stats")).json()["tier"]
                if tier["error"]:
                    raise RuntimeError(f"the server's tier failed: {tier['error']}")
                window = (tier["started"], tier["ended"])
            else:
                await anyio.sleep(warm + 1)
                threads = args.serve_pin_threads
                got = await anyio.to_thread.run_sync(
                    lambda: run_bring_up(method, nbytes, args, threads=threads)
                )
                window = (got["started"], got["ended"])
            await anyio.sleep(args.tail_s)
        finally:
            samples = await anyio.to_thread.run_sync(probe.stop)
    during, idle, n_in, n_out = p99_inside_and_out(samples, window, probe.started + warm)
    return {"method": method, "bring_up_s": window[1] - window[0], "p99_during_ms": during,
            "p99_idle_ms": idle, "during": n_in, "idle": n_out}  # fmt: skip


# -- the report ----------------------------------------------------------------------------------
def methods_here(asked: Sequence[str]) -> tuple[list[str], list[str]]:
    """The methods that can run here, and those skipped (torch needs CUDA)."""
    cuda = cuda_usable()
    run = [m for m in asked if cuda or not m.startswith("torch")]
    return run, [m for m in asked if m not in run]


def bench(args: argparse.Namespace) -> None:
    methods, skipped = methods_here(args.methods.split(","))
    say: Callable[[str], None] = lambda line: print(line, flush=True)  # noqa: E731
    say(f"bring-up, each method in its own process; CUDA: {'yes' if cuda_usable() else 'no'}"
        + (f"; skipped (no CUDA): {', '.join(skipped)}" if skipped else ""))  # fmt: skip
    sizes = [args.gib, *(float(s) for s in args.sizes.split(",") if s)]
    table: dict[tuple[str, float], dict[str, Any]] = {}
    for gib in sizes:
        for method in methods:
            got = table[method, gib] = run_bring_up(method, int(gib * GiB), args)
            say(f"  {method:>15} {gib:6.1f} GiB: {got['seconds']:7.2f} s, "
                f"{got['seconds'] / gib:.3f} s/GiB, pinned {got['pinned'] / (gib * GiB):.2f}x "
                f"asked, {got['calls']} pinning calls ({got['backend']})")  # fmt: skip
    say("")
    head = f"{'method':>15} " + " ".join(f"{f'{g:g} GiB: s (pinned/asked)':>26}" for g in sizes)
    say(head + f" {'s/GiB at ' + format(args.gib, 'g'):>12} {'vs aiopinned':>13}")
    base = table.get(("aiopinned", args.gib))
    for method in methods:
        cells = " ".join(
            f"{table[method, g]['seconds']:>17.2f} ({table[method, g]['pinned'] / (g * GiB):.2f})"
            for g in sizes
        )
        mine = table[method, args.gib]["seconds"]
        ratio = f"{mine / base['seconds']:.2f}x" if base else "-"
        say(f"{method:>15} {cells} {mine / args.gib:>12.3f} {ratio:>13}")
    if base:
        for method in methods[1:]:
            say(f"aiopinned takes {base['seconds'] / table[method, args.gib]['seconds']:.2f}x "
                f"the time of {method} for {args.gib:g} GiB")  # fmt: skip

    page, carve = args.page_kib << 10, int(args.carve_gib * GiB)
    tier = run_bring_up("aiopinned", carve, args)
    each = run_bring_up("aiopinned", carve, args, segment=page)
    say(f"\ncarving {args.carve_gib:g} GiB into {args.page_kib} KiB pages: reserve "
        f"{tier['calls']} pinning calls in {tier['seconds']:.2f} s; one pinning per page "
        f"{each['calls']} calls in {each['seconds']:.2f} s "
        f"({each['seconds'] / tier['seconds']:.2f}x the time)")  # fmt: skip
    sweep = []  # (segment_bytes' default, 1 GiB: what larger or smaller segments would cost)
    for mib in (int(m) for m in args.segments_mib.split(",") if m):
        got = run_bring_up("aiopinned", carve, args, segment=mib * MiB)
        sweep.append(
            f"{mib} MiB: {got['calls']} calls, {got['seconds'] / args.carve_gib:.3f} s/GiB"
        )
    if sweep:
        say("segment_bytes: " + "; ".join(sweep))

    if args.serve_gib:
        rows = anyio.run(serving, args, methods)
        say(f"\nserving small requests ({args.concurrency} connections) while a "
            f"{args.serve_gib:g} GiB tier comes up")  # fmt: skip
        say(f"{'method':>15} {'bring-up s':>11} {'p99 idle ms':>12} {'p99 during ms':>14} "
            f"{'during/idle':>12} {'requests during':>16}")  # fmt: skip
        for r in rows:
            say(f"{r['method']:>15} {r['bring_up_s']:>11.2f} {r['p99_idle_ms']:>12.2f} "
                f"{r['p99_during_ms']:>14.2f} {r['p99_during_ms'] / r['p99_idle_ms']:>11.2f}x "
                f"{r['during']:>16}")  # fmt: skip
        threads = args.serve_pin_threads or "default"
        say(f"(pin_threads: {threads}; in the server's own process the other methods would "
            "stop its loop for their whole bring-up)")  # fmt: skip


async def serving(args: argparse.Namespace, methods: Sequence[str]) -> list[dict[str, Any]]:
    import tempfile

    dims = [int(d) for d in args.dims.split(",")]
    with tempfile.TemporaryDirectory(prefix="aiopinned-tier-") as tmp:
        payloads = os.path.join(tmp, "small.npz")
        await anyio.to_thread.run_sync(bench_server.save_payloads, payloads, dims, 0, 1, 4)
        return [await serve_during(m, args, payloads) for m in methods]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", choices=("bench", "bringup", "probe"), default="bench")
    parser.add_argument("--gib", type=float, default=64, help="the tier's size (GiB)")
    parser.add_argument("--sizes", default="20.4,40,60", help="more sizes (GiB) that round badly")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--page-kib", type=int, default=2048, help="the tier's page (KiB)")
    parser.add_argument("--pin-threads", type=int, help="aiopinned's touch threads (default)")
    parser.add_argument("--carve-gib", type=float, default=8, help="the carving row's tier")
    parser.add_argument(
        "--segments-mib",
        default="64,256,1024,2048",
        help="segment_bytes to sweep in the carving row (MiB)",
    )
    parser.add_argument("--serve-gib", type=float, default=64, help="0: no serving rows")
    parser.add_argument(
        "--serve-pin-threads",
        type=int,
        default=8,
        help="touch threads while serving (the load shares the cores)",
    )
    parser.add_argument("--dims", default="256,512,256", help="the example server's model")
    parser.add_argument("--concurrency", type=int, default=4, help="the probe's connections")
    parser.add_argument("--warm-s", type=float, default=2.0, help="the probe's warm-up")
    parser.add_argument("--tail-s", type=float, default=2.0, help="probing after a bring-up")
    # (the bring-up and probe processes)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--segment-bytes", type=int, default=1 << 30, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--payloads", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "bringup":
        got = bring_up(args.method, args.bytes, args.page_kib << 10, args.pin_threads,
                       args.segment_bytes)  # fmt: skip
        print(json.dumps(got), flush=True)
    elif args.mode == "probe":
        probe_process(args)
    else:
        with contextlib.suppress(KeyboardInterrupt):
            bench(args)


if __name__ == "__main__":
    main()
