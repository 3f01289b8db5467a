"""A load's plan: the selected tensors' byte regions, each with one device buffer, cut into chunks
at multiples of ``chunk_bytes`` in the file (so that ``O_DIRECT`` can read them)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._format import Entry, regions
from ._reader import ALIGN, FileReader


@dataclass
class Chunk:
    reader: FileReader
    dest: Any  # the region's device (or host) buffer
    begin: int  # file offsets
    end: int
    region_begin: int
    last: list[Entry]  # the tensors whose last byte is in this chunk (in file order)

    @property
    def lead(self) -> int:
        """Bytes before ``begin`` in its buffer, so that file offsets keep their alignment."""
        return self.begin % ALIGN

    @property
    def buffer_bytes(self) -> int:
        return -(-(self.lead + self.end - self.begin) // ALIGN) * ALIGN


def plan(
    readers: Sequence[FileReader], chosen: Sequence[Sequence[Entry]], target: Any, size: int
) -> list[Chunk]:
    chunks: list[Chunk] = []
    for reader, entries in zip(readers, chosen, strict=True):
        for begin, end, members in regions([e for e in entries if e.nbytes]):
            dest = target.empty(end - begin)
            cuts = [begin, *range((begin // size + 1) * size, end, size), end]
            pending = deque(members)
            for a, b in itertools.pairwise(cuts):
                last = []
                while pending and pending[0].end <= b:
                    last.append(pending.popleft())
                chunks.append(Chunk(reader, dest, a, b, begin, last))
    return chunks
