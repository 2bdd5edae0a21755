"""MemberSet: local range updates give the same CIDRs, and deltas, as recomputing from scratch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.compiler.members import MemberSet
from stockade.model.addresses import Family, merge_ranges, ranges_to_networks

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=20), ops)
def test_member_set_matches_full_recompute(initial: list[int], steps: list[tuple[bool, int]]) -> None:
    ms = MemberSet(Family.V4, initial)
    counts: dict[int, int] = {}
    for a in initial:
        counts[a] = counts.get(a, 0) + 1
    for add, a in steps:
        before = set(ms.networks())
        if add:
            added, removed = ms.add(a)
            counts[a] = counts.get(a, 0) + 1
        else:
            added, removed = ms.remove(a)
            if counts.get(a, 0) > 1:
                counts[a] -= 1
            else:
                counts.pop(a, None)
        expected = ranges_to_networks(merge_ranges((x, x) for x in counts), Family.V4)
        assert ms.networks() == expected
        assert (before - removed) | added == set(expected)
        assert not (added & removed)
