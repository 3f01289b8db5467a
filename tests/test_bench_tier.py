"""benchmarks/bench_tier.py on the host backend, small: every method that can run without CUDA
pins exactly what it was asked for, and the whole benchmark prints its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_tier

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


@pytest.mark.parametrize("method", ["aiopinned", "vllm"])
def test_a_bring_up_pins_what_it_was_asked_for(method: str) -> None:
    got = bench_tier.bring_up(method, 20 * MiB + 4096, 2 * MiB, 2, 8 * MiB)
    assert got["pinned"] == 20 * MiB + 4096 and got["ended"] >= got["started"]
    assert got["calls"] == (3 if method == "aiopinned" else 1)  # (8 MiB segments of 2 MiB pages)


def test_requests_are_split_by_the_bring_up_window() -> None:
    samples = [(t / 10, 1.0 + (5.0 if 10 <= t <= 20 else 0.0)) for t in range(40)]
    during, idle, n_in, n_out = bench_tier.p99_inside_and_out(samples, (1.0, 2.0), 0.2)
    assert (during, idle, n_in) == (6.0, 1.0, 11) and n_out == 40 - 11 - 2 - 2 - 2
    with pytest.raises(RuntimeError, match="too few"):
        bench_tier.p99_inside_and_out(samples, (5.0, 6.0), 0.0)


def test_the_benchmark_runs_and_prints_its_tables() -> None:
    argv = ["--gib", "0.125", "--sizes", "0.07", "--carve-gib", "0.0625", "--serve-gib", "0.25",
            "--warm-s", "0.5", "--tail-s", "0.5", "--serve-pin-threads", "1"]  # fmt: skip
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_tier.py"), *argv],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "skipped (no CUDA): torch, torch-register" in text or "CUDA: yes" in text
    assert "0.125 GiB: s (pinned/asked)" in text and "(1.00)" in text
    assert "carving 0.0625 GiB into 2048 KiB pages: reserve 1 pinning calls" in text
    assert "32 calls" in text  # one pinning per page
    assert "segment_bytes: 64 MiB: 1 calls" in text  # (the sweep: 64 MiB holds it all)
    assert "serving small requests" in text and text.count("x ") >= 2
