"""``_sorted.merge``: a run of items into a sorted list in one splice, equal to adding them one
by one, with the library's own invariants (``_check``) holding after every merge."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedKeyList, SortedList

from aiopinned._sorted import _splice, merge


def neg(x: int) -> int:
    return -x


@settings(max_examples=300, deadline=None)
@given(
    held=st.lists(st.integers(0, 10**6), unique=True, max_size=3000),
    runs=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 2500)), max_size=6),
    keyed=st.booleans(),
    load=st.sampled_from([4, 16, 1000]),
)
def test_merging_runs_equals_adding_one_by_one(
    held: list[int], runs: list[tuple[int, int]], keyed: bool, load: int
) -> None:
    def make() -> SortedList:
        return SortedKeyList(held, key=neg) if keyed else SortedList(held)

    got, want = make(), make()
    got._reset(load)
    for start, length in runs:
        items = [x for x in range(start, start + length) if x not in want]  # (keys stay unique)
        merge(got, items)
        want.update(items)
        got._check()
        assert list(got) == list(want)


def test_a_run_with_a_held_item_inside_it_is_not_spliced() -> None:
    into = SortedList(range(0, 10000, 100))
    assert not _splice(into, [150, 250])  # 200 is held: one add each instead
    assert _splice(into, [110, 120, 130])  # nothing held between 110 and 130
    assert not _splice(into, [300])  # an equal item: left to add
    into._check()
    assert list(into)[:5] == [0, 100, 110, 120, 130]


def test_a_large_run_splits_its_sublist_as_add_would() -> None:
    into = SortedKeyList([10**9 + i for i in range(5000)], key=neg)
    into._reset(16)
    assert _splice(into, sorted(range(100000), key=neg))
    into._check()
    assert len(into) == 105000 and into[-1] == 0 and into[0] == 10**9 + 4999
