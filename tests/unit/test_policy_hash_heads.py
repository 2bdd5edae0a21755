"""``policy_hash`` with the heads kept across flushes: the same digest, each host's own fields
encoded once while they do not change (a global change hashed 25,000 hosts per flush on the
writer, each one's mode, addresses and failsafe encoded to JSON anew: 15 % of its samples)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from stockade.compiler.ir import AddressSet
from stockade.controller.services import host_state
from stockade.controller.services.host_state import Digests, Heads, policy_hash
from stockade.model import EnforcementMode
from stockade.model.addresses import Family
from tests.unit.test_agent_core import host_policy


def test_kept_heads_give_the_same_digest_and_encode_a_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded: list[str] = []
    real = host_state.host_policy_to_dict

    def counting(hp: Any) -> Any:
        encoded.append(hp.workload)
        return real(hp)

    monkeypatch.setattr(host_state, "host_policy_to_dict", counting)
    memo: Digests = {}
    heads: Heads = {}
    base = host_policy("web1", peers=("10.0.0.2/32",))
    moved = replace(base, sets=(AddressSet("peer1", Family.V4, (ipaddress.ip_network("10.0.0.3/32"),)),
                                *base.sets[1:]))
    variants = [base, moved, moved, replace(moved, mode=EnforcementMode.SELECTIVE),
                replace(moved, local_addresses=(ipaddress.ip_address("10.0.0.9"),)), replace(moved, backend="iptables"),
                moved, replace(base, workload="web2")]
    for hp in variants:
        encoded.clear()
        fresh = policy_hash(hp)  # no memo, no heads: the reference
        assert encoded == [hp.workload]
        encoded.clear()
        assert policy_hash(hp, memo, heads) == fresh
        assert len(encoded) <= 1
    encoded.clear()
    for hp in (moved, moved, replace(moved, sets=base.sets)):  # only sets move: no head encoded again
        assert policy_hash(hp, memo, heads) == policy_hash(hp)
    assert encoded == ["web1"] * 3  # the three reference hashes only


def test_pg_lines_joins_only_what_splits_back() -> None:
    assert host_state.pg_lines(["a", "b.c", "k8s.ns.pod-1"]) == "a\nb.c\nk8s.ns.pod-1"
    assert host_state.pg_lines(["one"]) == "one"
    assert host_state.pg_lines(["a\nb", "c"]) is None  # would split into three: the array is bound instead
    assert host_state.pg_lines([""]) is None  # string_to_array('') is empty, not one empty value
    assert host_state.pg_lines(["", "x"]) == "\nx"  # two values: splits back to ['', 'x']
