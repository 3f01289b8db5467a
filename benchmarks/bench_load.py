"""Model weights from disk to the GPU: aiopinned.load_safetensors against the loaders servers use.

    python benchmarks/bench_load.py                      # a 16 GB Llama-3-8B-shaped checkpoint
    python benchmarks/bench_load.py --gib 2 --rounds 1   # smaller, quicker

The checkpoint (``--dir``, default ``$TMPDIR/aiopinned-llama``: bf16, 4 shards and an index,
shaped like Llama-3-8B, scaled by ``--gib``) is written once and reused, with each tensor's
checksums in a manifest.  Each row loads every tensor to ``cuda:0`` and synchronizes, in a
process of its own (so that its peak RSS is its own), in two cache states:

* **warm**: the files read once just before;
* **cold**: ``posix_fadvise(DONTNEED)`` on every file before the row (proved by a raw buffered
  read, printed beside it).

Rows alternate their order over rounds; a peer that is not installed prints as skipped.  Every
tensor every loader returns is checked on the device against the manifest (a byte sum and a sum
of every 4093rd byte).  In the same run, the limits: the files' raw read bandwidth into pinned
memory (buffered warm and cold; ``O_DIRECT`` at 1-32 threads, 16 and 64 MiB reads; warm, also
the page cache's own pages registered read-only and copied to the device, the other way a
loader could skip the CPU's copy), host->device from one pinned buffer, and device
memory for the checkpoint allocated per file against per tensor.  Each cold row is proved cold
by a buffered read just before it (the disk's pace, not the page cache's).  Ratios are against
the fastest peer and against the state's limit (the lower of the copy ceiling and the best raw
read).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from aiopinned.loader._reader import drop_page_cache

GB, MiB = 1e9, 1 << 20
LOADERS = ("aiopinned", "safetensors", "fastsafetensors", "runai", "instanttensor")
STRIDE = 4093


# -- the checkpoint -------------------------------------------------------------------------------
def llama_shapes(scale: float) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-3-8B's tensors (vocab 128256, hidden 4096, MLP 14336, 32 layers, 8 KV heads),
    ``scale`` of its layers (at least one)."""
    v, h, m, kv = 128256, 4096, 14336, 1024
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(max(1, round(32 * scale))):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                (p + "mlp.down_proj.weight", (h, m))]  # fmt: skip
    return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def checksums(data: np.ndarray) -> tuple[int, int]:
    """A tensor's bytes: their sum, and the sum of every ``STRIDE``-th byte (order-sensitive)."""
    return int(data.sum(dtype=np.uint64)), int(data[::STRIDE].sum(dtype=np.uint64))


def make_checkpoint(folder: Path, gib: float, shards: int = 4) -> dict[str, Any]:
    """The checkpoint in ``folder`` (written if missing or of another size); its manifest."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        meta = json.loads(manifest.read_text())
        if meta.get("gib") == gib and all((folder / f).exists() for f in meta["files"]):
            return meta  # type: ignore[no-any-return]
    folder.mkdir(parents=True, exist_ok=True)
    tensors = llama_shapes(gib / 16.06)
    noise = np.random.default_rng(0).integers(0, 256, 64 * MiB + 4096, dtype=np.uint8)
    per_shard = -(-len(tensors) // shards)
    files, sums, weight_map = [], {}, {}
    for s in range(shards):
        part = tensors[s * per_shard : (s + 1) * per_shard]
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for tname, shape in part:
            nbytes = int(np.prod(shape)) * 2
            header[tname] = {"dtype": "BF16", "shape": list(shape),
                             "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
            weight_map[tname] = name
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / name, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for i, (tname, shape) in enumerate(part):
                nbytes, start = (
                    int(np.prod(shape)) * 2,
                    (zlib.crc32(tname.encode()) & 0xFFFF) * 61 + i,
                )
                data = np.resize(np.roll(noise, start), nbytes)  # (each tensor its own bytes)
                sums[tname] = list(checksums(data))
                data.tofile(f)
        files.append(name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    meta = {"gib": gib, "files": files, "checksums": sums}
    manifest.write_text(json.dumps(meta))
    return meta


def cold_proof_gbps(path: Path, nbytes: int = 64 * MiB) -> float:
    """A buffered read of the file's last ``nbytes``, GB/s: the disk's pace if the cache was
    dropped, the page cache's (several times faster) if not."""
    with open(path, "rb", buffering=0) as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - nbytes))
        t0 = time.perf_counter()
        got = len(f.read(nbytes))
    return got / (time.perf_counter() - t0) / GB


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(64 * MiB):
                pass


# -- one row, in a process of its own ------------------------------------------------------------
def load_row(name: str, files: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load every tensor to cuda:0 with loader ``name``; (tensors, facts about the run)."""

    facts: dict[str, Any] = {}
    strs = [str(f) for f in files]
    if name == "aiopinned":
        return aiopinned_row(files)
    if name == "safetensors":
        import safetensors
        from safetensors.torch import load_file

        out = {}
        for f in strs:
            out.update(load_file(f, device="cuda:0"))
        facts.update(version=safetensors.__version__, backend="mmap, pageable copies",
                     pinned_peak=0)  # fmt: skip
        return out, facts
    if name == "fastsafetensors":
        import fastsafetensors
        from fastsafetensors import fastsafe_open

        with fastsafe_open(strs, device="cuda:0", nogds=True) as f:
            out = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        facts.update(version=fastsafetensors.__version__, backend="nogds: pread, bounce buffer")
        return out, facts
    if name == "runai":
        from importlib.metadata import version

        from runai_model_streamer import SafetensorsStreamer

        out = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_files(strs)
            for k, t in streamer.get_tensors():
                out[k] = t.to("cuda:0")
        facts.update(version=version("runai-model-streamer"), backend="pageable, .to(cuda)",
                     pinned_peak=0)  # fmt: skip
        return out, facts
    if name == "instanttensor":
        from importlib.metadata import version

        from instanttensor import safe_open

        out = {}
        with safe_open(strs, framework="pt", device=0) as f:
            for k, t in f.tensors():
                out[k] = t
        facts.update(version=version("instanttensor"), backend="its default policy")
        return out, facts
    raise ValueError(name)


def aiopinned_row(files: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """aiopinned's load, with the loop's longest stall (and, where one passed 5 ms, what the
    loop thread and the others were running then), and the garbage collector's longest pause
    meanwhile (a pass over a torch process's heap holds the GIL in whichever thread runs it)."""
    import gc
    import threading
    import traceback

    import anyio

    from aiopinned import PinnedPool, load_safetensors
    from aiopinned.loader import _pipeline

    async def run() -> tuple[Any, dict[str, Any]]:
        beat, worst, where = [time.perf_counter()], [0.0], [""]
        loop_thread, stop = threading.get_ident(), threading.Event()

        async def ticker() -> None:
            while True:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                worst[0] = max(worst[0], now - beat[0] - 0.001)
                beat[0] = now

        def watchdog() -> None:  # the longest stall past 5 ms: what the loop thread ran
            longest = 0.006
            while not stop.wait(0.0005):
                late = time.perf_counter() - beat[0]
                frames = sys._current_frames() if late > longest else {}
                if loop_thread in frames:  # (the loop's stack, and every other thread's top)
                    longest, stack = late, traceback.format_stack(frames[loop_thread], limit=6)
                    where[0] = " <- ".join(line.strip().split("\n")[0] for line in stack[::-1])
                    others = [traceback.format_stack(f, limit=2) for i, f in frames.items()
                              if i not in (loop_thread, threading.get_ident())]  # fmt: skip
                    tops = sorted({" | ".join(x.strip().split("\n")[0] for x in o[::-1])
                                   for o in others})  # fmt: skip
                    where[0] += "; other threads: " + " // ".join(tops)

        pauses: list[tuple[int, float]] = []  # (generation, ms) of each collection
        began = [0.0]

        def timed(phase: str, info: dict[str, int]) -> None:  # (collections never overlap)
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                pauses.append((info["generation"], (time.perf_counter() - began[0]) * 1e3))

        threading.Thread(target=watchdog, daemon=True).start()
        gc.callbacks.append(timed)
        try:
            async with (
                PinnedPool("cuda", max_bytes=_pipeline.DEFAULT_MAX_BYTES) as pool,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(ticker)
                out = await load_safetensors(files, "cuda:0", pool=pool)
                tg.cancel_scope.cancel()
                pooled = pool.stats().peak_reserved_bytes
        finally:
            stop.set()
            gc.callbacks.remove(timed)
        longest = max((ms for _, ms in pauses), default=0.0)
        report = out.report
        facts = {
            "stall_ms": worst[0] * 1e3,
            "stall_where": where[0],
            "gc": f"{len(pauses)} collections, the longest {longest:.1f} ms, "
            f"{sum(g == 2 for g, _ in pauses)} of generation 2",
            "report": vars(report),
            "version": "this tree",
            "pinned_peak": pooled,
            "cap": _pipeline.DEFAULT_MAX_BYTES,
            "backend": "page cache or O_DIRECT, per range",
        }
        return out, facts

    out, facts = anyio.run(run)
    return dict(out), facts


def device_checksums(tensors: dict[str, Any]) -> dict[str, tuple[int, int]]:
    import torch

    out = {}
    for k, t in tensors.items():
        b = t.contiguous().view(torch.uint8).reshape(-1)
        total = 0
        for i in range(0, b.numel(), 256 * MiB):
            total += int(b[i : i + 256 * MiB].sum(dtype=torch.int64))
        out[k] = (total, int(b[::STRIDE].sum(dtype=torch.int64)))
    return out


def row_main(name: str, files: list[Path]) -> None:
    """``--row``: load once, check, print a JSON line."""
    import torch

    torch.cuda.init()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        tensors, facts = load_row(name, files)
    except ImportError as exc:
        print(json.dumps({"skipped": f"not installed ({exc.name})"}))
        return
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    sums = device_checksums(tensors)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "checksums": sums, "rss": rss, **facts}))


# -- the limits -----------------------------------------------------------------------------------
def raw_read_gbps(
    files: list[Path], threads: int, direct: bool, chunk: int = 16 * MiB, limit: float = 4e9
) -> float:
    """The files (their first ``limit`` bytes) read in ``chunk`` pieces by ``threads`` threads
    into pinned memory, as fast as the storage (or the page cache) gives them."""
    import torch

    buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(threads)]
    jobs = [(f, o) for f in files for o in range(0, f.stat().st_size, chunk)]
    jobs = jobs[: max(1, int(limit // chunk))]
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {f: os.open(f, flags) for f in files}

    def work(k: int) -> int:
        view, done = memoryview(buffers[k].numpy()), 0
        for f, o in jobs[k::threads]:
            n = os.preadv(fds[f], [view], o)
            done += n
        return done

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(work, range(threads)))
    seconds = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    return total / seconds / GB


def registered_page_cache_gbps(files: list[Path], limit: float = 4e9) -> float:
    """The other warm path: the files' cached pages mapped, registered read-only
    (``cudaHostRegisterReadOnly``) and copied to the device straight from the page cache, no CPU
    copy; GB/s of the whole (registration included), or NaN where CUDA refuses."""
    import mmap

    import torch

    from aiopinned.backends._cudart import check, rt

    flags = rt.cudaHostRegisterReadOnly | rt.cudaHostRegisterPortable
    dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    done, t0 = 0, time.perf_counter()
    for path in files:
        size = min(path.stat().st_size, int(limit) - done) // mmap.PAGESIZE * mmap.PAGESIZE
        if size <= 0:
            break
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        ptr = _address_of(mapped)
        err = rt.cudaHostRegister(ptr, size, flags)[0]
        if err != rt.cudaError_t.cudaSuccess:
            mapped.close()
            return float("nan")
        try:
            for at in range(0, size, 1 << 30):
                n, kind = min(1 << 30, size - at), rt.cudaMemcpyKind.cudaMemcpyHostToDevice
                check(rt.cudaMemcpy(dev.data_ptr(), ptr + at, n, kind), "cudaMemcpy")
        finally:
            check(rt.cudaHostUnregister(ptr), "cudaHostUnregister")
            mapped.close()
        done += size
    return done / (time.perf_counter() - t0) / GB


def _address_of(mapped: Any) -> int:
    """The address of a read-only mmap (ctypes cannot take one from it: it is not writable)."""
    import numpy as np

    return int(np.frombuffer(mapped, dtype=np.uint8).ctypes.data)


def allocation_ms(meta: dict[str, Any], files: list[Path]) -> tuple[float, float]:
    """Device memory for the whole checkpoint: one allocation per file, against one per tensor
    (ms each, the caching allocator emptied first)."""
    import torch

    sizes = [f.stat().st_size for f in files]
    per_tensor = [int(np.prod(s)) * 2 for _, s in llama_shapes(meta["gib"] / 16.06)]
    out = []
    for plan in (sizes, per_tensor):
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        held = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in plan]
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
        del held
    torch.cuda.empty_cache()
    return out[0], out[1]


def copy_ceiling_gbps() -> float:
    import torch

    from aiopinned._bench import copy_gbps

    host = torch.empty(512 * MiB, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    return max(copy_gbps(torch, host, dev, True, 5) for _ in range(3))


# -- the run ------------------------------------------------------------------------------------
def run_row(name: str, files: list[Path]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--row", name, *map(str, files)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"skipped": f"failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "aiopinned-llama")
    parser.add_argument("--gib", type=float, default=16.0, help="checkpoint size (GB, about)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--states", default="warm,cold")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.row:
        return row_main(args.row, [Path(p) for p in rest])
    say(f"checkpoint: {args.dir} ({args.gib} GB), written if missing")
    meta = make_checkpoint(args.dir, args.gib)
    files = [args.dir / f for f in meta["files"]]
    say("limits: raw reads and the copy ceiling")
    limits: dict[str, float] = {"copy": copy_ceiling_gbps()}
    per_file, per_tensor = allocation_ms(meta, files)
    say(f"device memory: one allocation per file {per_file:.1f} ms, per tensor {per_tensor:.1f} ms")
    warm_cache(files)
    limits["warm buffered, 16 threads"] = raw_read_gbps(files, 16, direct=False)
    limits["warm, page cache registered and copied"] = registered_page_cache_gbps(files)
    for threads in (1, 4, 16, 32):
        limits[f"O_DIRECT, {threads} threads"] = raw_read_gbps(files, threads, direct=True)
    limits["O_DIRECT, 16 threads of 64 MiB reads"] = raw_read_gbps(
        files, 16, direct=True, chunk=64 * MiB
    )
    drop_page_cache(files)
    limits["cold buffered, 1 thread"] = raw_read_gbps(files, 1, direct=False)
    drop_page_cache(files)
    limits["cold buffered, 16 threads"] = raw_read_gbps(files, 16, direct=False)
    direct_best = max(v for k, v in limits.items() if k.startswith("O_DIRECT"))
    cold_read = max(direct_best, limits["cold buffered, 16 threads"])
    registered = limits["warm, page cache registered and copied"]
    warm_read = max(
        limits["warm buffered, 16 threads"], 0 if math.isnan(registered) else registered
    )
    bound = {"warm": min(limits["copy"], warm_read),
             "cold": min(limits["copy"], cold_read)}  # fmt: skip
    say("limits, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()))
    loaders = args.loaders.split(",")
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for state in args.states.split(","):
        for r in range(args.rounds):
            for name in loaders if r % 2 == 0 else loaders[::-1]:
                proof = None
                if state == "warm":
                    warm_cache(files)
                else:
                    drop_page_cache(files)
                    proof = cold_proof_gbps(files[-1])  # (then dropped again)
                    drop_page_cache(files)
                say(f"{state} round {r + 1}: {name}")
                got = run_row(name, files)
                got["proof"] = proof
                if "checksums" in got:
                    sums = got.pop("checksums")
                    got["wrong"] = [k for k, v in meta["checksums"].items()
                                    if tuple(sums.get(k, ())) != tuple(v)]  # fmt: skip
                results.setdefault((state, name), []).append(got)
                if "seconds" in got:  # (as it goes: a run cut short still says something)
                    extra = {k: got[k] for k in ("stall_ms", "stall_where", "gc", "report")
                             if k in got}  # fmt: skip
                    say(f"  {got['bytes'] / got['seconds'] / GB:.1f} GB/s, "
                        f"{len(got['wrong'])} wrong, {extra}")  # fmt: skip
                else:
                    say(f"  {got.get('skipped')}")
    report(limits, bound, results, files, loaders, args)


def report(
    limits: dict[str, float],
    bound: dict[str, float],
    results: dict[tuple[str, str], list[dict[str, Any]]],
    files: list[Path],
    loaders: list[str],
    args: argparse.Namespace,
) -> None:
    import torch

    nbytes = sum(f.stat().st_size for f in files)
    print(f"\n{torch.cuda.get_device_name()}, {nbytes / GB:.2f} GB in {len(files)} files, "
          f"{args.rounds} rounds (ranges over the rounds; ratios of each row's best)")  # fmt: skip
    print("limits, GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()))
    for state in args.states.split(","):
        names = [name for name in loaders if (state, name) in results]
        speeds = {
            name: [nbytes / r["seconds"] / GB for r in results[(state, name)] if "seconds" in r]
            for name in names
        }
        peers = [max(v) for n, v in speeds.items() if not n.startswith("aiopinned") and v]
        best_peer = max(peers, default=float("nan"))
        print(f"\n{state} (limit {bound[state]:.1f} GB/s)")
        print(
            f"  {'loader':<16} {'GB/s':>12} {'x best peer':>12} {'x limit':>8} {'RSS GB':>7}  notes"
        )
        for name in names:
            rows, done = results[(state, name)], speeds[name]
            if not done:
                print(f"  {name:<16} {'skipped':>12}  {rows[0].get('skipped', '')}")
                continue
            ok = [r for r in rows if "seconds" in r]
            wrong = sum(len(r["wrong"]) for r in ok)
            notes = f"{ok[0].get('version')}, {ok[0].get('backend', '')}"
            if state == "cold":
                proofs = ", ".join(f"{r['proof']:.1f}" for r in ok)
                notes += f"; buffered read just before (cold proof): {proofs} GB/s"
            pinned = [int(r["pinned_peak"]) for r in ok if r.get("pinned_peak") is not None]
            if len(pinned) == len(ok):
                notes += f"; pinned peak {max(pinned) / MiB:.0f} MiB"
            if name.startswith("aiopinned"):
                worst = max(ok, key=lambda r: r["stall_ms"])
                notes += f" (cap {ok[0]['cap'] / MiB:.0f} MiB)"
                notes += f"; loop stall max {worst['stall_ms']:.2f} ms"
                if worst["stall_where"]:
                    notes += f" (the loop was in: {worst['stall_where']})"
                notes += f"; garbage collector: {worst['gc']}"
                read = {k: v for k, v in ok[-1]["report"].items() if v}
                notes += f"; read {read}"
            print(
                f"  {name:<16} {min(done):5.1f}-{max(done):<6.1f} {max(done) / best_peer:>11.2f}x "
                f"{max(done) / bound[state]:>7.2f}x {max(r['rss'] for r in ok) / GB:>7.2f}  "
                f"{f'WRONG: {wrong} tensors; ' if wrong else ''}{notes}"
            )


if __name__ == "__main__":
    main()
