"""One checkpoint onto every GPU of a host: each rank reading all of it, against the ranks
sharing the reads (``load_safetensors(group=...)``: each reads its share and receives the rest
by NCCL broadcast, over NVLink).

    python benchmarks/bench_load_shared.py                # every GPU, bench_load's checkpoint
    python benchmarks/bench_load_shared.py --gib 2 --ranks 2

Rows, each in both cache states (warm: the files read just before; cold: dropped from the page
cache first), every tensor checked on every rank against the checkpoint's manifest:

* **1 rank**: one process loads the checkpoint to its GPU (the baseline);
* **N ranks, each reads all**: what N replicas do today, each on its own;
* **N ranks, shared**: each reads 1/N of the bytes, the rest arrives by broadcast.

GB/s is the checkpoint's bytes over the time until the last rank has all of it; the ratio is
against one rank.  Needs CUDA and NCCL (``--ranks`` of at most the GPUs present).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiopinned.loader._format import checkpoint_files
from aiopinned.loader._reader import drop_page_cache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_load  # (its checkpoint, manifest and device checksums)

MODES = ("each reads all", "shared")


def index_files(folder: Path) -> list[Path]:
    """The checkpoint's files, as its index names them."""
    return checkpoint_files(folder / "model.safetensors.index.json")


def worker(rank: int, ranks: int, port: int, mode: str, state: str, folder: Path) -> None:
    """One rank of a row: load, check, print a JSON line (rank 0: the row's time)."""
    import torch
    import torch.distributed as dist

    import aiopinned

    torch.cuda.set_device(rank)
    where = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=ranks,
                            init_method=f"tcp://127.0.0.1:{port}", device_id=where)  # fmt: skip
    files = index_files(folder)
    if state == "cold" and rank == 0:
        drop_page_cache(files)
    dist.barrier()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    group = dist.group.WORLD if mode == "shared" else None
    tensors = asyncio.run(aiopinned.load_safetensors(files, f"cuda:{rank}", group=group))
    torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - t0
    meta = json.loads((folder / "manifest.json").read_text())
    sums = bench_load.device_checksums(tensors)
    ok = {k: list(v) for k, v in sums.items()} == meta["checksums"]
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(json.dumps({"seconds": seconds, "bytes": nbytes, "ok": ok,
                      "read": tensors.report.moved_bytes}))  # fmt: skip
    dist.destroy_process_group()


def run_row(ranks: int, mode: str, state: str, folder: Path) -> dict[str, Any]:
    """All ranks of one row, each a process of its own; the slowest rank's time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if state == "warm":
        bench_load.warm_cache(index_files(folder))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), str(ranks), str(port), mode, state,
             str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in range(ranks)
    ]  # fmt: skip
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1800)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            return {"failed": (stderr or stdout).strip().splitlines()[-1:]}
        outs.append(json.loads(lines[-1]))
    return {"seconds": max(o["seconds"] for o in outs), "bytes": outs[0]["bytes"],
            "ok": all(o["ok"] for o in outs), "read": [o["read"] for o in outs]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "aiopinned-llama")
    parser.add_argument("--gib", type=float, default=16.0, help="checkpoint size (GB, about)")
    parser.add_argument("--ranks", type=int, default=0, help="GPUs to use (default: all)")
    parser.add_argument("--states", default="warm,cold")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        rank, ranks, port, mode, state, folder = args.worker
        worker(int(rank), int(ranks), int(port), mode, state, Path(folder))
        return
    import torch

    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ranks = args.ranks or present
    if not 2 <= ranks <= present:
        parser.error(f"needs 2 or more CUDA devices (--ranks {ranks}, {present} present)")
    bench_load.make_checkpoint(args.dir, args.gib)
    print(f"{ranks} ranks, {torch.cuda.get_device_name(0)}; checkpoint {args.dir}")
    print("| state | row | s | GB/s per rank | vs 1 rank | read by each rank (GB) | checked |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for state in args.states.split(","):
        base = run_row(1, "each reads all", state, args.dir)
        for name, got in [("1 rank", base)] + [
            (f"{ranks} ranks, {mode}", run_row(ranks, mode, state, args.dir)) for mode in MODES
        ]:
            if "failed" in got:
                print(f"| {state} | {name} | failed: {got['failed']} | | | | |")
                continue
            gbps = got["bytes"] / got["seconds"] / 1e9
            ratio = base["seconds"] / got["seconds"] if "seconds" in base else float("nan")
            reads = ", ".join(f"{r / 1e9:.2f}" for r in got["read"])
            print(f"| {state} | {name} | {got['seconds']:.2f} | {gbps:.1f} | {ratio:.2f}x "
                  f"| {reads} | {'yes' if got['ok'] else 'NO'} |")  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    main()
