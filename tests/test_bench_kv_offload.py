"""benchmarks/bench_kv_offload.py on the host backend, small: the tier's bookkeeping (LRU slots,
swaps in and out, every kind of request), and the whole benchmark printing its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import bench_kv_offload as bench

ROOT = Path(__file__).resolve().parent.parent


def test_the_lru_evicts_the_least_recently_used_and_reuses_its_slots() -> None:
    lru, gone = bench.Lru(6), []
    a = lru.take(1, 3, lambda p, s: gone.append(p))
    b = lru.take(2, 3, lambda p, s: gone.append(p))
    lru.touch(1)
    c = lru.take(3, 3, lambda p, s: gone.append(p))
    assert gone == [2] and sorted(c.tolist()) == sorted(b.tolist()) and 2 not in lru
    assert set(a.tolist()) | set(c.tolist()) == set(range(6))


def test_the_benchmark_serves_every_kind_of_request_and_prints_its_tables() -> None:
    argv = ["--batch", "32", "--rounds", "2", "--page-kib", "4", "--page-kib-serve", "4",
            "--pages-per-prefix", "4", "--prefixes", "30", "--gpu-prefixes", "4", "--requests",
            "120", "--layers", "1", "--hidden", "32", "--width", "64", "--prefix-tokens", "64",
            "--new-tokens", "4", "--load", "0.2"]  # fmt: skip
    script = ROOT / "benchmarks" / "bench_kv_offload.py"
    out = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "batches of 32 scattered pages" in text and "batch in" in text
    for label in ("with tier: device", "with tier: host", "with tier: miss", "recompute: miss"):
        assert label in text, text
    assert "a prefix from the host tier against recomputing one" in text
    swaps = [line for line in text.splitlines() if "pages swapped in" in line]
    assert "swapped in 0, out 0" not in swaps[0] and "swapped in 0, out 0" in swaps[1]


def test_arrivals_follow_the_load_and_the_zipf_prefixes() -> None:
    class Args:
        prefixes, zipf, requests, load = 100, 1.0, 4000, 0.5

    arrivals = bench.make_arrivals(Args(), 0.01)  # type: ignore[arg-type]
    times = np.array([t for t, _ in arrivals])
    prefixes = np.array([p for _, p in arrivals])
    assert abs(np.diff(times).mean() - 0.02) < 0.002  # one per 20 ms at half of 100/s
    counts = np.bincount(prefixes, minlength=100)
    assert counts[0] > counts[9] > counts[99] and counts.argmax() == 0
