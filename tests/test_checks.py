"""Argument checks: a typed error at once for anything that is not what the API takes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aiopinned._checks import (
    as_backend,
    as_copy,
    as_max_bytes,
    as_seconds,
    as_size,
    as_timeout,
    pointer_of,
)


@pytest.mark.parametrize("good", [0, 5, np.int64(7), np.uint32(9)])
def test_sizes_are_ints_or_index_types(good: object) -> None:
    assert as_size(good) == int(good)  # type: ignore[call-overload]


@pytest.mark.parametrize(("bad", "error"), [(True, TypeError), (1.0, TypeError),
                         ("1", TypeError), (None, TypeError), (-1, ValueError)])  # fmt: skip
def test_other_sizes_are_refused(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        as_size(bad)


def test_timeouts_and_seconds() -> None:
    assert as_timeout(None) == math.inf and as_timeout(2) == 2.0
    for bad, error in (
        (-1, ValueError),
        (math.nan, ValueError),
        ("1", TypeError),
        (True, TypeError),
    ):
        with pytest.raises(error):
            as_timeout(bad)
    assert as_seconds(math.inf, "spin_s") == math.inf


def test_max_bytes_and_backend() -> None:
    assert as_max_bytes(None) is None and as_max_bytes(10) == 10
    with pytest.raises(ValueError):
        as_max_bytes(0)
    assert as_backend("host") == "host"
    with pytest.raises(ValueError):
        as_backend("gpu")
    with pytest.raises(TypeError):
        as_backend(3)


def test_copy_arguments() -> None:
    assert as_copy(16, 32, 0) == (16, 32, 0)
    assert as_copy(0, 0, 0) == (0, 0, 0)  # nothing to copy: no address is read
    with pytest.raises(ValueError, match="null"):
        as_copy(0, 32, 4)


def test_pointers_of_ints_array_likes_and_tensors() -> None:
    arr = np.zeros(4)
    assert pointer_of(arr) == arr.ctypes.data and pointer_of(123) == 123

    class Tensorish:
        def data_ptr(self) -> int:
            return 0x1000

    assert pointer_of(Tensorish()) == 0x1000
    with pytest.raises(TypeError):
        pointer_of("0x1000")
    with pytest.raises(ValueError):
        pointer_of(-8)
