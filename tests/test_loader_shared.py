"""``load_safetensors(group=...)``: every rank of a ``torch.distributed`` group gets the whole
checkpoint, each reading its share of the bytes and receiving the rest by broadcast (gloo here,
two processes on the host backend; NCCL on GPUs)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aiopinned.loader._format import Entry
from aiopinned.loader._shared import owners

from .test_loader import sn, tensors

pytest.importorskip("torch.distributed")

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import numpy as np, torch.distributed as dist
    from safetensors.numpy import load_file
    import aiopinned
    from aiopinned.loader import _reader

    rank, port, fail, backend, files = int(sys.argv[1]), *sys.argv[2:5], sys.argv[5:]
    if fail == str(rank):  # this rank's reads fail
        def broken(*args, **kwargs):
            raise OSError(5, "Input/output error")
        _reader.FileReader.read_into = broken
    device = None
    if backend == "nccl":
        import torch
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, rank=rank, world_size=2,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        got = asyncio.run(aiopinned.load_safetensors(files, device, group=dist.group.WORLD))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
    else:
        want = {}
        for f in files:
            want.update(load_file(f))
        if device is not None:
            assert all(t.device.index == rank for t in got.values())
            got = {k: t.cpu().numpy() for k, t in got.items()}
        same = got.keys() == want.keys() and all(
            got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            and np.array_equal(got[k], want[k]) for k in want)
        print(json.dumps({"same": same, "read": got.report.moved_bytes}))
    dist.destroy_process_group()
    """
)


def run_ranks(files: list[Path], fail: int = -1, backend: str = "gloo") -> list[dict[str, object]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(rank), str(port), str(fail), backend, *files],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, stderr[-2000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_the_shares_are_runs_of_about_equal_bytes() -> None:
    sizes = [10, 10, 10, 10, 30, 10, 0, 20]
    entries, at = [], 0
    for i, n in enumerate(sizes):
        entries.append(Entry(f"t{i}", "U8", (n,), at, at + n))
        at += n
    got = owners(entries, 2)
    assert got == sorted(got) and set(got) == {0, 1}  # runs in checkpoint order
    shares = [sum(n for n, r in zip(sizes, got, strict=True) if r == k) for k in (0, 1)]
    assert abs(shares[0] - shares[1]) <= 30  # (within the largest tensor)
    assert owners(entries, 1) == [0] * len(sizes)
    assert set(owners(entries[:2], 4)) <= {0, 1, 2, 3}  # more ranks than tensors: some read none


def two_gpus() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available() and torch.cuda.device_count() >= 2)


@pytest.mark.parametrize(
    "backend",
    ["gloo", pytest.param("nccl", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not two_gpus(), reason="needs two CUDA devices")])],
)  # fmt: skip
def test_two_ranks_each_read_a_share_and_both_get_everything(tmp_path: Path, backend: str) -> None:
    files, total = [], 0
    for s in range(2):
        part = tensors(s, 12)
        files.append(tmp_path / f"model-{s}.safetensors")
        sn.save_file(part, files[-1])
        total += sum(a.nbytes for a in part.values())
    got = run_ranks(files, backend=backend)
    assert all(r["same"] for r in got), got
    reads = [int(r["read"]) for r in got]  # type: ignore[call-overload]
    assert sum(reads) == total and min(reads) > 0  # each byte read once, by one rank


def test_a_rank_whose_share_fails_fails_every_rank_without_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    sn.save_file({"a": np.arange(1000, dtype="float32"), "b": np.ones(999, "int16")}, path)
    got = run_ranks([path], fail=1)
    assert "another rank" in str(got[0]["error"]) and "Input/output" in str(got[1]["error"])


def test_the_benchmark_says_what_it_needs_where_there_are_not_two_gpus() -> None:
    if two_gpus():
        pytest.skip("two GPUs here: the benchmark runs (a GPU session's step)")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_load_shared.py"), "--gib", "0.01"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and "needs 2 or more CUDA devices" in out.stderr
