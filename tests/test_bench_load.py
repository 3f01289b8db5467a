"""benchmarks/bench_load.py's checkpoint, on a small model (the loads themselves need a GPU): it
writes a valid sharded checkpoint, and its manifest's checksums are those of the bytes each
tensor holds (read back here by the loader's own header parser and reader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aiopinned import FileReader
from aiopinned.loader._format import checkpoint_files, read_header
from benchmarks import bench_load


def test_the_checkpoint_reads_back_to_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = [("embed", (1000, 64)), ("norm", (64,)), ("odd", (3, 7)), ("big", (512, 300))]
    monkeypatch.setattr(bench_load, "llama_shapes", lambda scale: shapes)
    meta = bench_load.make_checkpoint(tmp_path, 0.001, shards=2)
    files = checkpoint_files(tmp_path / "model.safetensors.index.json")
    assert [f.name for f in files] == meta["files"]
    seen = {}
    for path in files:
        with FileReader(path) as reader:
            for entry in read_header(path).entries:
                data = np.empty(entry.nbytes, dtype=np.uint8)
                reader.read_into(memoryview(data), entry.begin)
                seen[entry.name] = list(bench_load.checksums(data))
                assert entry.dtype == "BF16"
    assert seen == {k: list(v) for k, v in meta["checksums"].items()}
    assert len({tuple(v) for v in seen.values()}) == len(shapes)  # every tensor its own bytes
    assert bench_load.make_checkpoint(tmp_path, 0.001, shards=2) == meta  # (reused, not rewritten)
