"""The examples, run as programs, as their users run them (host backend, so they run in CI)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks import bench_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MODEL = "32,48,48,16"  # in and out of different widths on purpose

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn's loop


def run(script: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    if check:
        assert out.returncode == 0, out.stderr
    return out


async def status_of_raw(url: str, head: str) -> int:
    """Send a raw request head (and nothing more); the status of the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        await writer.drain()
        return int((await reader.readline()).split()[1])
    finally:
        writer.close()


# -- the inference server -------------------------------------------------------------------------
async def test_the_server_answers_correctly_and_refuses_bad_requests() -> None:
    argv = ["--backend", "host", "--max-mib", "0.0625", "--dims", MODEL, "--streams", "2",
            "--read-timeout", "0.5"]  # fmt: skip
    async with bench_server.server_process("pinned", argv) as running:
        url = running.url
        for rows in (1, 3, 17):
            report = await bench_server.run_load(url, concurrency=4, requests=24, rows=rows)
            assert report.requests == 24  # and run_load checked every answer
        async with httpx.AsyncClient(base_url=url) as c:
            r = await c.post("/infer", content=b"")
            assert r.status_code == 400 and "float32 rows" in r.text
            assert (await c.post("/infer", content=b"\0" * (32 * 4 + 2))).status_code == 400
            r = await c.post("/infer", content=b"\0" * (32 * 4 * 1024))  # 128 KiB > 64 KiB cap
            assert r.status_code == 413 and "at most 341" in r.text
            chunked = "POST /infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            # no Content-Length: no admission (411, once the chunks have not ended in time)
            assert await status_of_raw(url, chunked) == 411
            assert (await c.get("/infer")).status_code == 405
            health = await c.get("/health")  # (ready: no tier to wait for)
            assert (health.status_code, health.json()) == (200, {"tier": None})
            stats = (await c.get("/stats")).json()
    assert stats["model"] == {"dims": [32, 48, 48, 16], "seed": 0, "engine": "numpy (host)"}
    assert stats["server"]["ok"] == 72 and stats["server"]["rejected"] == 4
    assert stats["pool"]["active_bytes"] == 0 and stats["pool"]["cache_hits"] > 0
    assert stats["pool"]["peak_reserved_bytes"] <= 64 * 1024


async def test_the_server_serves_while_its_tier_comes_up_and_health_says_when() -> None:
    argv = ["--backend", "host", "--dims", MODEL, "--streams", "2", "--tier-gib", "0.25",
            "--tier-page-kib", "64", "--tier-after-s", "0.5", "--pin-threads", "1"]  # fmt: skip
    async with (
        bench_server.server_process("pinned", argv) as running,
        httpx.AsyncClient(base_url=running.url) as c,
    ):
        before = await c.get("/health")
        assert before.status_code == 503 and before.json()["tier"]["up"] is False
        report = await bench_server.run_load(running.url, concurrency=2, requests=16, rows=2)
        assert report.requests == 16  # answered whatever the tier's state
        for _ in range(600):
            if (health := await c.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        tier = health.json()["tier"]
        assert health.status_code == 200 and tier["pinned_bytes"] == tier["bytes"] == 1 << 28
        assert tier["ended"] >= tier["started"] and tier["error"] is None
        assert (await c.get("/stats")).json()["tier"] == tier


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--max-mib", "0"], "--max-mib must be > 0"), (["--dims", "8"], "two widths"),
     (["--streams", "0"], "--streams >= 1"), (["--tier-gib", "-1"], "--tier-gib: must be >= 0"),
     (["--tier-page-kib", "1"], "--tier-page-kib: must be >= 4")],
)  # fmt: skip
def test_the_server_refuses_bad_command_lines(argv: list[str], message: str) -> None:
    out = run(EXAMPLES / "inference_server.py", "serve", *argv, check=False)
    assert out.returncode == 2 and message in out.stderr


# -- the prefetch pipeline ------------------------------------------------------------------------
def test_the_pipeline_sums_every_file_on_the_device_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    paths, expected = [], []
    for i, size in enumerate([70_001, 0, 4096, 1, 65_536, 3, 200_000, 12_345]):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        paths.append(tmp_path / f"f{i}.bin")
        paths[-1].write_bytes(data.tobytes())
        expected.append(int(data.sum(dtype=np.int64)))
    out = run(EXAMPLES / "prefetch_pipeline.py", *map(str, paths), "--depth", "2",
              "--backend", "host")  # fmt: skip
    lines = [line.split("  ") for line in out.stdout.splitlines()]
    assert lines == [[str(s), str(p)] for s, p in zip(expected, paths, strict=True)]
    peak, cap = map(int, re.search(r"pinned at most (\d+) of (\d+) bytes", out.stderr).groups())
    assert "8 files" in out.stderr and cap == 2 * 200_000 and peak <= cap


def test_the_pipeline_demo_runs() -> None:
    out = run(EXAMPLES / "prefetch_pipeline.py", "--demo", "--backend", "host")
    assert len(out.stdout.splitlines()) == 32 and "GB/s" in out.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [([], "give files, or --demo"), (["--demo", "x"], "not both"),
     (["no-such-file"], "not files: no-such-file"), (["--demo", "--depth", "0"], "--depth >= 1")],
)  # fmt: skip
def test_the_pipeline_refuses_bad_command_lines(argv: list[str], message: str) -> None:
    out = run(EXAMPLES / "prefetch_pipeline.py", *argv, check=False)
    assert out.returncode == 2 and message in out.stderr


def test_the_quickstart_runs() -> None:
    out = run(EXAMPLES / "quickstart.py")
    assert "200 x 16 MiB staged" in out.stdout and "the last copy checked" in out.stdout


def test_the_readme_quick_start_says_what_it_needs_and_runs_where_it_can() -> None:
    """It needs CUDA torch: the README says so in one line, pointing to the example that runs
    anywhere; where CUDA is usable, the code runs as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("<!-- --8<-- [end:quickstart] -->")[0]
    note, code = section.split("```python", 1)
    assert "needs an NVIDIA GPU and CUDA torch" in note and "examples/quickstart.py" in note
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no usable CUDA device: the note is checked, not the code")
    out = subprocess.run([sys.executable, "-c", code.split("```")[0]], capture_output=True,
                         text=True, timeout=120, check=False)  # fmt: skip
    assert out.returncode == 0 and "PoolStats(" in out.stdout, out.stderr


def test_a_transformers_llama_streams_in_and_answers_as_safetensors_loads_it() -> None:
    pytest.importorskip("transformers")
    out = run(EXAMPLES / "load_model.py", "--layers", "2")
    assert "the forward pass matches safetensors' load: True" in out.stdout
