"""python -m aiopinned info: what it finds, and the warnings it gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aiopinned._info import Device, Info, advise, numa_node_of, render
from aiopinned.backends._hugepages import thp_setting


def fake_sys(tmp_path: Path, bus: str, node: str | None, thp: str | None,
             defrag: str | None = None) -> Path:  # fmt: skip
    if node is not None:
        dev = tmp_path / "bus" / "pci" / "devices" / bus
        dev.mkdir(parents=True)
        (dev / "numa_node").write_text(node + "\n")
    if thp is not None:
        mm = tmp_path / "kernel" / "mm" / "transparent_hugepage"
        mm.mkdir(parents=True)
        (mm / "enabled").write_text(thp + "\n")
        if defrag is not None:
            (mm / "defrag").write_text(defrag + "\n")
    return tmp_path


@pytest.mark.parametrize(("node", "expected"), [("1", 1), ("0", 0), ("-1", None), (None, None)])
def test_the_numa_node_of_a_device_comes_from_sysfs(
    tmp_path: Path, node: str | None, expected: int | None
) -> None:
    root = fake_sys(tmp_path, "0000:3b:00.0", node, None)
    assert numa_node_of("0000:3B:00.0", root) == expected  # (CUDA spells the id in capitals)


@pytest.mark.parametrize(
    ("text", "mode"),
    [("always [madvise] never", "madvise"), ("[always] madvise never", "always"),
     ("always madvise [never]", "never"), (None, None)],
)  # fmt: skip
def test_the_huge_page_mode_is_the_bracketed_word(
    tmp_path: Path, text: str | None, mode: str | None
) -> None:
    root = fake_sys(tmp_path, "x", None, text, "always defer defer+madvise [madvise] never")
    assert thp_setting("enabled", root) == mode
    assert thp_setting("defrag", root) == (None if text is None else "madvise")


def info(**kw: object) -> Info:
    base = Info(backend="cuda", why="a CUDA device is usable", driver_cuda="13.0",
                versions={"cuda-bindings": "13.1.0"}, thp="madvise", thp_defrag="defer+madvise",
                memlock_bytes=None,
                devices=[Device(0, "H200", "0000:3b:00.0", 0)])  # fmt: skip
    for k, v in kw.items():
        setattr(base, k, v)
    return base


@pytest.mark.parametrize(
    ("change", "says"),
    [({}, None),
     ({"driver_cuda": "12.4"}, "install 'aiopinned[cu12]'"),
     ({"driver_cuda": None}, "no NVIDIA driver"),
     ({"thp": "never"}, "transparent huge pages are off"),
     ({"thp_defrag": "madvise"}, "echo defer+madvise"),
     ({"thp_defrag": "always"}, "pinning='hugetlb'"),
     ({"thp": "never", "thp_defrag": "madvise"}, "transparent huge pages are off"),
     ({"memlock_bytes": 64 << 20}, "ulimit -l"),
     ({"devices": [Device(0, "H200", "0000:3b:00.0", None)]}, "no NUMA node")],
)  # fmt: skip
def test_each_problem_gets_a_warning_with_its_fix(change: dict[str, object], says: str) -> None:
    warnings = advise(info(**change))
    assert warnings == [] if says is None else any(says in w for w in warnings), warnings


def test_render_shows_devices_and_warnings() -> None:
    found = info(thp="never")
    found.warnings = advise(found)
    text = render(found)
    assert "cuda:0 H200  pci 0000:3b:00.0  numa node 0" in text
    assert "warning: transparent huge pages are off" in text
    assert "transparent huge pages: never, defrag defer+madvise" in text


def test_render_shows_reserved_huge_pages() -> None:
    text = render(info(hugetlb={2 << 20: [8, 3], 1 << 30: [None, None]}))
    assert "reserved huge pages of 2 MiB (pinning='hugetlb'): 8 set aside, 3 free" in text
    assert "reserved huge pages of 1024 MiB (pinning='hugetlb'): unknown" in text


def test_the_command_line_prints_text_and_json() -> None:
    out = subprocess.run([sys.executable, "-m", "aiopinned", "info"], capture_output=True,
                         text=True, check=True, timeout=120)  # fmt: skip
    assert out.stdout.startswith("backend (auto): ") and "RLIMIT_MEMLOCK" in out.stdout
    out = subprocess.run([sys.executable, "-m", "aiopinned", "info", "--json"],
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    found = json.loads(out.stdout)
    assert found["backend"] in ("cuda", "host") and found["versions"]["aiopinned"]
    bad = subprocess.run([sys.executable, "-m", "aiopinned", "nonsense"], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
