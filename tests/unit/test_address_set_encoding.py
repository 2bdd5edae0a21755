"""The wire form of a shared address set is computed once for all the hosts a change wakes.

When one change wakes N hosts, each answer (``host_policy_to_dict``) used to turn every member of
every set into text again; the compiler shares one AddressSet object between the hosts, so the
members' text is now kept per object (by identity): N answers, one conversion per set.
"""

from __future__ import annotations

import ipaddress

from stockade.compiler.ir import AddressSet, address_set_to_dict
from stockade.model.addresses import Family


class _CountingNet(ipaddress.IPv4Network):
    calls = 0

    def __str__(self) -> str:
        _CountingNet.calls += 1
        return super().__str__()


def _members(n: int) -> tuple[_CountingNet, ...]:
    return tuple(_CountingNet(f"10.9.{i // 256}.{i % 256}/32") for i in range(n))


def test_one_shared_set_encoded_for_many_hosts_converts_its_members_once() -> None:
    shared = AddressSet("set-web", Family.V4, _members(500), "role=web")
    _CountingNet.calls = 0
    answers = [address_set_to_dict(shared) for _ in range(500)]  # 500 hosts woken by one change
    assert _CountingNet.calls == 500  # one str() per member, not 500 x 500
    assert answers[0]["members"][:2] == ["10.9.0.0/32", "10.9.0.1/32"] and len(answers[0]["members"]) == 500
    assert all(a == answers[0] for a in answers)
    answers[0]["members"].append("mutated")  # each answer owns its list: a caller's edit stays its own
    assert len(address_set_to_dict(shared)["members"]) == 500


def test_an_equal_but_distinct_set_is_encoded_from_its_own_members() -> None:
    a = AddressSet("s", Family.V4, _members(3), "x")
    b = AddressSet("s", Family.V4, (_CountingNet("10.8.0.0/24"),), "x")
    assert address_set_to_dict(a)["members"] == ["10.9.0.0/32", "10.9.0.1/32", "10.9.0.2/32"]
    assert address_set_to_dict(b)["members"] == ["10.8.0.0/24"]  # same name, another object: not the memo's
