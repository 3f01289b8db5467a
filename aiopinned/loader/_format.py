"""The safetensors format: where a checkpoint's files are, what their headers say, and every
check a header must pass before any memory is used for it.

A file is ``u64 header length (little-endian) | header (JSON) | data``; the header maps each
tensor's name to its dtype, shape and ``data_offsets`` (begin, end) within the data, and may hold
a ``__metadata__`` mapping of strings.  A malformed file is a ``ValueError`` that names the file
and what is wrong.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the largest header accepted (safetensors' own limit)
MAX_HEADER_BYTES = 100_000_000

#: dtype name -> (bytes per element, NumPy dtype string or None where NumPy has none)
DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, None),
    "F8_E4M3": (1, None),
    "F8_E8M0": (1, None),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, None),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "C64": (8, "complex64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    path: Path
    entries: tuple[Entry, ...]  #: by begin offset (absolute file offsets)


Paths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def checkpoint_files(paths: Paths) -> list[Path]:
    """A file, files, a directory (its ``*.safetensors``, sorted) or a sharded checkpoint's
    ``*.index.json`` (the files its ``weight_map`` names, in order of first mention)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise ValueError(f"{path}: a directory with no *.safetensors file")
            files.extend(found)
        elif path.name.endswith(".json"):
            files.extend(_indexed(path))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{path}: no such file or directory")
    if not files:
        raise ValueError("no checkpoint file given")
    if len(set(files)) != len(files):
        raise ValueError("a checkpoint file is named twice")
    return files


def _indexed(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = dict.fromkeys(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index}: not a safetensors index (a weight_map): {exc}") from None
    return [index.parent / str(shard) for shard in shards]


def read_header(path: Path) -> Header:
    """``path``'s header, checked (blocking: a few small reads)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, not even a header length")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a header of {length} bytes is absurdly large")
        if 8 + length > size:
            raise ValueError(f"{path}: the header length ({length}) runs past the end ({size})")
        raw = f.read(length)
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: the header is not JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    data_start = 8 + length
    entries = [
        _entry(path, name, spec, data_start, size - data_start)
        for name, spec in table.items()
        if name != "__metadata__"
    ]
    _check_metadata(path, table.get("__metadata__", {}))
    entries.sort(key=lambda e: (e.begin, e.end))
    for before, after in itertools.pairwise(entries):
        if after.begin < before.end:
            raise ValueError(f"{path}: tensors {before.name!r} and {after.name!r} overlap")
    return Header(path, tuple(entries))


def _entry(path: Path, name: str, spec: object, data_start: int, data_bytes: int) -> Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise ValueError(f"{where}: needs dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise ValueError(f"{where}: the shape {shape!r} is not a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
        raise ValueError(f"{where}: data_offsets {offsets!r} are not two non-negative ints")
    begin, end = offsets
    if not begin <= end <= data_bytes:
        raise ValueError(
            f"{where}: data_offsets {offsets} out of range (the data has {data_bytes} bytes)"
        )
    expected = math.prod(shape) * DTYPES[dtype][0]
    if expected != end - begin:
        raise ValueError(
            f"{where}: shape {shape} of {dtype} is {expected} bytes, the offsets {end - begin}"
        )
    return Entry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_metadata(path: Path, metadata: object) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")


def select(headers: Sequence[Header], names: Iterable[str] | None) -> list[list[Entry]]:
    """Each file's entries to load (all, or those named); a name twice, or one not found, is a
    ``ValueError``."""
    seen: dict[str, Path] = {}
    for header in headers:
        for entry in header.entries:
            if entry.name in seen:
                raise ValueError(
                    f"tensor {entry.name!r} is in both {seen[entry.name]} and {header.path}"
                )
            seen[entry.name] = header.path
    if names is None:
        return [list(h.entries) for h in headers]
    if isinstance(names, str):
        raise TypeError("names must be a collection of tensor names, not one str")
    wanted = set(names)
    missing = wanted - seen.keys()
    if missing:
        raise ValueError(f"no tensor named {sorted(missing)[:5]} in the checkpoint")
    return [[e for e in h.entries if e.name in wanted] for h in headers]


def regions(entries: Sequence[Entry]) -> list[tuple[int, int, list[Entry]]]:
    """Entries (by begin offset) merged into contiguous byte ranges: ``(begin, end, entries)``;
    what lies between two selected tensors is not read."""
    out: list[tuple[int, int, list[Entry]]] = []
    for entry in entries:
        if out and entry.begin == out[-1][1]:
            begin, _, members = out[-1]
            out[-1] = (begin, entry.end, [*members, entry])
        else:
            out.append((entry.begin, entry.end, [entry]))
    return out
