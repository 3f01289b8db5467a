"""python -m aiopinned bench: the core figures, as a table or JSON."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aiopinned", "bench", "--quick", *args],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


def test_quick_bench_reports_every_section_as_json() -> None:
    out = bench("--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    sections = {row["section"] for row in report["rows"]}
    assert {"cache hit, 1 MiB", "wake latency"} <= sections
    assert {f"pin and release, {m} MiB" for m in (16, 64, 256)} <= sections
    assert all(row["value"] > 0 for row in report["rows"])
    assert len(report["wake_us"]) == 50 and len(report["pin_s"]) == 3
    assert "cache hit" in out.stderr and "wake latency" in out.stderr  # the steps, as they run
    if report["backend"] == "cuda":
        assert any(row["peer"] == "torch" for row in report["rows"])


def test_the_table_and_the_plot(tmp_path: Path) -> None:
    target = tmp_path / "bench.png"
    out = bench("--plot", str(target))
    if importlib.util.find_spec("matplotlib") is None:  # said at once, before any benchmark
        assert out.returncode == 2 and "--plot needs matplotlib" in out.stderr
        assert out.stdout == "" and "cache hit" not in out.stderr
        pytest.skip("matplotlib is not installed: the message is checked, not the drawing")
    assert out.stdout.startswith("backend: ") and "wake latency" in out.stdout  # (printed first)
    assert out.returncode == 0, out.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_core_benchmarks_hit_table_has_each_row_against_the_dict() -> None:
    """``benchmarks/bench_core.py --hit-only``: both of the pool's calls and the plain baseline,
    each with its ratio to the baseline (to torch too, where CUDA is there)."""
    script = Path(__file__).parent.parent / "benchmarks" / "bench_core.py"
    out = subprocess.run([sys.executable, str(script), "--hit-only", "--hits", "300"],
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if " us " in line]
    names = {" ".join(r[: r.index("us") - 1]) for r in rows}
    assert {
        "await allocate + free",
        "allocate_nowait + free",
        "dict of lists + asyncio.Lock",
    } <= names
    assert all("dict" in r[-1] and float(r[r.index("us") - 1]) > 0 for r in rows)


def test_help_says_the_whole_description() -> None:
    out = subprocess.run([sys.executable, "-m", "aiopinned", "--help"],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert "``info`` about this machine, and ``bench`` for its core figures." in " ".join(
        out.stdout.split()
    )
