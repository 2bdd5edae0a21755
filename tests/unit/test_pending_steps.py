"""``PendingSteps`` (a follower's unbuilt set-only steps) answer exactly as ``HostHistory.after``.

``PendingSteps.update_since`` answers unbuilt (session 12): wherever it answers, it answers what
the built history answers, and it answers the agent one step behind whenever the steps chain.

For random runs of set-member steps, skipped revisions, rules changes and a history limit, the
history built from pending steps (when asked, or when the policy changes again before anyone
asked) gives every agent revision the same answer as the history built step by step.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.compiler import HostDelta, HostPolicy
from stockade.compiler.delta import HostHistory, PendingSteps
from stockade.compiler.ir import SetDelta
from stockade.model.addresses import Family
from tests.unit.test_agent_core import host_policy

LIMIT = 4


def _policy(members: frozenset[int], port: int) -> HostPolicy:
    return host_policy(peers=tuple(f"10.9.0.{m}/32" for m in sorted(members)) or ("10.9.1.0/32",), port=port)


def _delta(old: frozenset[int], new: frozenset[int], port: int, rules: bool) -> HostDelta:
    import ipaddress

    def nets(ms: frozenset[int]) -> tuple[ipaddress.IPv4Network, ...]:
        return tuple(ipaddress.IPv4Network(f"10.9.0.{m}/32") for m in sorted(ms))

    sd = SetDelta("peer1", Family.V4, nets(new - old), nets(old - new))
    return HostDelta("web1", _policy(new, port), rules, () if rules else (sd,))


def _answers(h: HostHistory) -> list[object]:
    return [h.update_since(s) for s in (None, *range(0, h.revision + 2))]


# a step: (member toggled, revisions skipped before it, rules change?, built now?)
steps = st.lists(st.tuples(st.integers(1, 6), st.sampled_from([0, 0, 0, 1]), st.sampled_from([False] * 5 + [True]),
                           st.booleans()), min_size=1, max_size=14)


@settings(max_examples=300, deadline=None)
@given(steps, st.booleans())
def test_pending_steps_answer_as_the_history_built_step_by_step(run: list[tuple[int, int, bool, bool]],
                                                                 start_without_history: bool) -> None:
    members: frozenset[int] = frozenset({1})
    port = 80
    eager: HostHistory | None = None if start_without_history else HostHistory.begin(1, _policy(members, port), LIMIT)
    lazy_hist = eager
    pending: PendingSteps | None = None
    rev = 0 if eager is None else eager.revision
    for toggle, skip, rules, build in run:
        rev += 1 + skip
        new = members ^ {toggle}
        new_port = port + 1 if rules else port
        delta = _delta(members, new, new_port, rules)
        assert delta.policy is not None
        members, port = new, new_port
        # step by step, as the writer does
        if eager is None:
            eager = HostHistory.begin(rev, delta.policy, LIMIT)
        else:
            after = eager.after(delta, rev)
            assert after is not None
            eager = after
        # the follower: set-only steps wait, anything else is built from the delta's policy
        if rules:
            if pending is not None:
                lazy_hist = pending.after(lazy_hist, delta, rev, LIMIT)
                pending = None
            elif lazy_hist is None:
                lazy_hist = HostHistory.begin(rev, delta.policy, LIMIT)
            else:
                got = lazy_hist.after(delta, rev)
                assert got is not None
                lazy_hist = got
        elif pending is not None:
            pending = pending.then(rev, delta.set_deltas, LIMIT)
        else:
            pending = PendingSteps.start(lazy_hist.revision if lazy_hist else None, rev, delta.set_deltas, LIMIT)
        if pending is not None:  # answered unbuilt where it can, exactly as the built history
            built = pending.onto(lazy_hist, delta.policy, LIMIT)
            for since in (None, *range(0, rev + 2)):
                quick = pending.update_since(lazy_hist, since, LIMIT)
                assert quick is None or quick == built.update_since(since), since
                if quick is not None and since is not None and since < rev:
                    assert quick.set_deltas is not None
            if not skip and not pending.restart and lazy_hist is not None and lazy_hist.revision == pending.base:
                assert pending.update_since(lazy_hist, rev - 1, LIMIT) is not None  # the common case
        if build and pending is not None:  # someone asked: the compiler holds this revision's policy
            lazy_hist = pending.onto(lazy_hist, delta.policy, LIMIT)
            pending = None
        if pending is None:
            assert lazy_hist is not None
            assert _answers(lazy_hist) == _answers(eager)
    if pending is not None:
        assert _answers(pending.onto(lazy_hist, _policy(members, port), LIMIT)) == _answers(eager)
