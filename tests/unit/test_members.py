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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=40), ops, st.integers(1, 4))
def test_chunked_members_match_a_flat_recompute_and_old_snapshots_stay(
    initial: list[int], steps: list[tuple[bool, int]], chunk: int
) -> None:
    """With tiny chunks every change crosses, splits or empties chunks: the chunks joined are the
    flat CIDR list, and a snapshot taken earlier (what an older policy holds) never changes."""
    ms = MemberSet(Family.V4, initial, chunk=chunk)
    counts: dict[int, int] = {}
    for a in initial:
        counts[a] = counts.get(a, 0) + 1
    history: list[tuple[tuple[tuple[object, ...], ...], tuple[object, ...]]] = []
    for add, a in steps:
        (ms.add if add else ms.remove)(a)
        if add:
            counts[a] = counts.get(a, 0) + 1
        elif counts.get(a, 0) > 1:
            counts[a] -= 1
        else:
            counts.pop(a, None)
        expected = ranges_to_networks(merge_ranges((x, x) for x in counts), Family.V4)
        snap = ms.chunks()
        assert tuple(n for c in snap for n in c) == expected
        if ms.flat() is None:  # changed at least once: chunked (before that, the flat tuple)
            assert all(0 < len(c) <= 2 * chunk for c in snap) or snap == ((),)
        history.append((snap, expected))
    for snap, expected in history:
        assert tuple(n for c in snap for n in c) == expected
    assert ms.networks() == ranges_to_networks(merge_ranges((x, x) for x in counts), Family.V4)


def test_a_change_copies_one_chunk_not_the_set() -> None:
    """One address added to a 10,000-member set: every chunk but the one it lands in is shared."""
    ms = MemberSet(Family.V4, range(0, 20_000, 2), chunk=64)
    ms.add(1)  # the first change cuts the flat tuple into chunks
    ms.remove(1)
    before = ms.chunks()
    ms.add(10_001)
    after = ms.chunks()
    shared = {id(c) for c in before} & {id(c) for c in after}
    assert len(after) - len(shared) == 1
    assert ms.flat() is None  # not joined until someone asks
    assert len(ms.networks()) == 10_000  # 10,000-10,002: a /31 and a /32 where two /32s were
