"""aiopinned.loader on the host backend: the range reader (page cache, O_DIRECT, refused
O_DIRECT), and safetensors checkpoints loaded equal to safetensors' own loader, malformed files
refused by name, cancellation that leaves nothing behind."""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from aiopinned import FileReader, PinnedPool, load_safetensors, stream_safetensors
from aiopinned.backends._memory import not_resident
from aiopinned.loader import ALIGN
from aiopinned.loader._reader import drop_page_cache

from .conftest import until

sn = pytest.importorskip("safetensors.numpy")
pytestmark = pytest.mark.anyio
KB, MB = 1024, 1 << 20
DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "float16", "int32", "uint32", "float32",
          "int64", "uint64", "float64", "complex64"]  # fmt: skip


def uncache(path: Path) -> None:
    drop_page_cache([path])


def tensors(seed: int, count: int) -> dict[str, np.ndarray]:
    """Every NumPy dtype, odd sizes (so later tensors sit at unaligned offsets), zero-size
    tensors, and one large enough to span several chunks."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(count):
        dtype = DTYPES[i % len(DTYPES)]
        shape = [(3, 5, 7), (0, 4), (1,), (17,), (2, 0), (1001,), (64, 129)][i % 7]
        out[f"layer{seed}.{i}.{dtype}"] = (rng.random(shape) * 100).astype(dtype)
    out[f"big{seed}"] = rng.random((300, 257)).astype("float32")  # 300 KiB: several chunks
    return out


def write_checkpoint(tmp: Path, shards: int = 3) -> tuple[Path, dict[str, np.ndarray]]:
    """A sharded checkpoint with its index, and everything it holds."""
    every: dict[str, np.ndarray] = {}
    weight_map = {}
    for s in range(shards):
        part = tensors(s, 20)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        sn.save_file(part, tmp / name)
        every.update(part)
        weight_map.update(dict.fromkeys(part, name))
    index = tmp / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, every


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def same(got: dict[str, Any], expected: dict[str, np.ndarray]) -> None:
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert np.array_equal(got[name], want), name


# -- the reader -------------------------------------------------------------------------------
def test_the_reader_copies_what_is_cached_and_reads_the_rest_direct(tmp_path: Path) -> None:
    data = os.urandom(64 * ALIGN + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    buf = np.frombuffer(mmap.mmap(-1, len(data)), dtype=np.uint8)  # (page-aligned)
    with FileReader(path) as reader:  # (just written: cached)
        report = reader.read_into(memoryview(buf)[100:], 100)
        assert bytes(buf[100:]) == data[100:] and report.cached_bytes == len(data) - 100
        uncache(path)
        buf[:] = 0
        offset = ALIGN + 7  # an unaligned head and tail around an aligned middle
        view = memoryview(buf)[offset : offset + 40 * ALIGN]
        report = reader.read_into(view, offset)  # (address and offset agree modulo ALIGN)
        assert bytes(view) == data[offset : offset + 40 * ALIGN]
        assert report.cached_bytes == 0 and report.direct_bytes == 39 * ALIGN
        assert report.buffered_bytes == ALIGN
        uncache(path)
        shifted = memoryview(buf)[offset + 1 : offset + 1 + 8 * ALIGN]  # (they do not)
        report = reader.read_into(shifted, offset)
        assert bytes(shifted) == data[offset : offset + 8 * ALIGN]
        assert report.buffered_bytes == 8 * ALIGN and not reader.report.direct_refused
        with pytest.raises(EOFError):
            reader.read_into(memoryview(bytearray(ALIGN)), len(data) - 10)


def test_a_cold_read_reads_nothing_twice_through_the_page_cache(tmp_path: Path) -> None:
    """A ``RWF_NOWAIT`` read that misses still starts readahead for what it asked; the reader
    asks for one page first, so a cold chunk is read ``O_DIRECT`` and not also read ahead (a
    16 MiB chunk asked for whole had 8 MiB read ahead on CI's disk)."""
    chunk, count = 16 * MB, 2
    path = tmp_path / "cold.bin"
    path.write_bytes(os.urandom(chunk * count))
    uncache(path)
    buf = mmap.mmap(-1, chunk)
    with FileReader(path) as reader:
        for at in range(0, chunk * count, chunk):
            reader.read_into(memoryview(buf), at)
        if reader.report.direct_refused or not reader.report.direct_bytes:
            pytest.skip(f"no O_DIRECT or RWF_NOWAIT here: {reader.report}")
        assert reader.report.direct_bytes == chunk * count
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        missing = not_resident(view.ctypes.data, len(view))
        resident = len(view) - sum(n for _, n in missing)
        del view
    assert resident <= count * 16 * ALIGN, f"{resident} bytes read ahead into the page cache"


def test_the_reader_can_be_told_one_way(tmp_path: Path) -> None:
    data = os.urandom(16 * ALIGN)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    buf = mmap.mmap(-1, len(data))
    with FileReader(path, direct=False) as reader:
        uncache(path)
        assert reader.read_into(memoryview(buf), 0).buffered_bytes == len(data)
    with FileReader(path, direct=True) as reader:  # (cached now, read direct all the same)
        assert reader.read_into(memoryview(buf), 0).direct_bytes == len(data)
        assert bytes(buf) == data
    with pytest.raises(ValueError, match="direct must be"):
        FileReader(path, direct="yes")


def test_a_file_system_that_refuses_o_direct_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(8 * ALIGN)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    real_open = os.open

    def refusing(p: Any, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    caplog.set_level("WARNING", logger="aiopinned")
    with FileReader(path, direct=True) as reader:
        for _ in range(3):
            buf = mmap.mmap(-1, len(data))
            assert reader.read_into(memoryview(buf), 0).buffered_bytes == len(data)
            assert bytes(buf) == data
        assert reader.report.direct_refused and "O_DIRECT" in reader.report.direct_refused
    assert caplog.text.count("reading through the page cache") == 1


# -- safetensors --------------------------------------------------------------------------------
@pytest.mark.parametrize("direct", ["auto", True, False])
@pytest.mark.parametrize("cold", [False, True])
async def test_a_sharded_checkpoint_loads_equal_to_safetensors(
    tmp_path: Path, direct: bool | str, cold: bool
) -> None:
    index, expected = write_checkpoint(tmp_path)
    if cold:
        for shard in shards(tmp_path):
            uncache(shard)
    seen: list[tuple[int, int]] = []
    got = await load_safetensors(index, direct=direct, chunk_bytes=8 * ALIGN, max_bytes=256 * KB,
                                 progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    same(got, expected)
    for shard in shards(tmp_path):  # and file by file, against safetensors itself
        same({k: got[k] for k in sn.load_file(shard)}, sn.load_file(shard))
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] < b[0] for a, b in itertools.pairwise(seen))
    report = got.report
    if cold and direct is not False:
        assert report.direct_bytes > 0
    if direct is False:
        assert report.direct_bytes == 0


async def test_a_file_a_directory_and_a_list_load_alike(tmp_path: Path) -> None:
    _, expected = write_checkpoint(tmp_path, shards=2)
    files = shards(tmp_path)
    same(await load_safetensors(tmp_path), expected)
    same(await load_safetensors(files), expected)
    same(await load_safetensors(files[0]), sn.load_file(files[0]))


async def test_names_select_tensors_and_only_their_bytes_are_read(tmp_path: Path) -> None:
    index, expected = write_checkpoint(tmp_path, shards=2)
    names = ["big0", "layer1.3.int16", "layer0.1.uint8"]
    got = await load_safetensors(index, names=names)
    same(got, {n: expected[n] for n in names})
    assert got.report.moved_bytes == sum(expected[n].nbytes for n in names)
    with pytest.raises(ValueError, match="no tensor named"):
        await load_safetensors(index, names=["nope"])
    with pytest.raises(TypeError, match="not one str"):
        await load_safetensors(index, names="big0")


async def test_tensors_stream_out_before_the_load_ends(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    expected = {f"t{i}": np.full(64 * KB, i, dtype=np.uint8) for i in range(32)}
    sn.save_file(expected, path)
    progress: list[int] = []
    order = []
    loading = stream_safetensors(
        path, chunk_bytes=16 * ALIGN, max_bytes=128 * KB, progress=lambda d, t: progress.append(d)
    )
    async for name, array in loading:
        order.append((name, len(progress)))
        assert np.array_equal(array, expected[name])
    assert [n for n, _ in order] == sorted(expected)  # file order (safetensors sorts by name)
    assert order[0][1] < len(progress)  # the first came out while later chunks were still read


async def test_a_callers_pool_stages_the_load_and_is_left_open_and_quiet(tmp_path: Path) -> None:
    index, expected = write_checkpoint(tmp_path, shards=2)
    async with PinnedPool("host", max_bytes=128 * KB) as pool:
        same(await load_safetensors(index, pool=pool, chunk_bytes=8 * ALIGN), expected)
        await until(lambda: pool.stats().pending_events == 0)
        s = pool.stats()
        assert (s.active_bytes, s.waiters) == (0, 0) and s.peak_reserved_bytes <= 128 * KB


@pytest.mark.parametrize("after", [0, 25, 45])  # (the first 18 are zero-size: no read)
async def test_cancelling_mid_load_leaves_the_pool_with_nothing_active(
    tmp_path: Path, after: int
) -> None:
    index, _ = write_checkpoint(tmp_path)
    async with PinnedPool("host", max_bytes=64 * KB) as pool:
        got = 0
        loading = stream_safetensors(index, pool=pool, chunk_bytes=4 * ALIGN)
        async for _ in loading:
            got += 1
            if got > after:
                break
        await loading.aclose()  # type: ignore[attr-defined]
        with anyio.move_on_after(0.001):  # cancelled in the middle, wherever it is
            await load_safetensors(index, pool=pool, chunk_bytes=4 * ALIGN)
        await until(lambda: pool.stats().pending_events == 0)
        s = pool.stats()
        assert (s.active_requests, s.active_bytes, s.waiters) == (0, 0, 0)


# -- malformed files ----------------------------------------------------------------------------
def raw_file(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
MALFORMED = [
    ("truncated", lambda p: p.write_bytes(b"\x01\x02"), "truncated"),
    ("header past the end", lambda p: raw_file(p, GOOD, length=10_000), "past the end"),
    ("absurd header", lambda p: raw_file(p, GOOD, length=1 << 40), "absurdly large"),
    ("not json", lambda p: raw_file(p, b"{nope"), "not JSON"),
    ("not an object", lambda p: raw_file(p, [1, 2]), "not a JSON object"),
    ("unknown dtype", lambda p: raw_file(p, {"a": {**GOOD["a"], "dtype": "F13"}}, bytes(8)),
     "unknown dtype"),
    ("bad shape", lambda p: raw_file(p, {"a": {**GOOD["a"], "shape": [-2]}}, bytes(8)),
     "not a list of non-negative ints"),
    ("shape disagrees", lambda p: raw_file(p, {"a": {**GOOD["a"], "shape": [3]}}, bytes(8)),
     "12 bytes, the offsets 8"),
    ("out of range", lambda p: raw_file(p, GOOD, bytes(4)), "out of range"),
    ("overlapping", lambda p: raw_file(p, {**GOOD, "b": {"dtype": "U8", "shape": [4],
                                                         "data_offsets": [4, 8]}}, bytes(8)),
     "overlap"),
    ("missing keys", lambda p: raw_file(p, {"a": {"dtype": "F32"}}, bytes(8)), "needs dtype"),
    ("bad metadata", lambda p: raw_file(p, {**GOOD, "__metadata__": {"k": 1}}, bytes(8)),
     "__metadata__"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_a_malformed_file_is_refused_by_name_with_nothing_leaked(
    tmp_path: Path, case: str, make: Any, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)
    async with PinnedPool("host") as pool:
        with pytest.raises(ValueError, match=message) as info:
            await load_safetensors(path, pool=pool)
        assert str(path) in str(info.value)
        assert pool.stats().reserved_bytes == 0  # nothing was staged


async def test_bad_arguments_are_refused_at_once(tmp_path: Path) -> None:
    path = sn.save_file({"a": np.zeros(4, np.float32)}, tmp_path / "a.safetensors") or (
        tmp_path / "a.safetensors"
    )
    with pytest.raises(ValueError, match="no such file"):
        await load_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="chunk_bytes must be a multiple"):
        await load_safetensors(path, chunk_bytes=1000)
    with pytest.raises(ValueError, match="threads must be"):
        await load_safetensors(path, threads=0)
    with pytest.raises(ValueError, match="direct must be"):
        await load_safetensors(path, direct="sometimes")
    with pytest.raises(TypeError, match="progress must be callable"):
        await load_safetensors(path, progress=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="named twice"):
        await load_safetensors([path, path])
    bf16_header = {"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
    bf16 = raw_file(tmp_path / "bf16.safetensors", bf16_header, bytes(4))
    with pytest.raises(ValueError, match="NumPy has no dtype"):
        await load_safetensors(bf16)


def test_where_the_cache_cannot_be_asked_auto_reads_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(16 * ALIGN)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    real = os.preadv

    def no_nowait(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", no_nowait)
    buf = mmap.mmap(-1, len(data))
    with FileReader(path) as reader:
        uncache(path)
        for _ in range(2):
            report = reader.read_into(memoryview(buf), 0)
            assert (report.buffered_bytes, report.direct_bytes) == (len(data), 0)
            assert bytes(buf) == data
