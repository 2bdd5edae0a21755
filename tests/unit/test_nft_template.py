"""The pure parts of the netlink table template (``backends.nftables.template``).

A template is reused for every pod of a shape, so the shape's key must ignore exactly what the
batch fills in per pod (peer-set members, the workload's name) and nothing else; the read-back
must not see a counter's values as tamper.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random

from stockade.backends.nfnetlink import attr, nest
from stockade.backends.nftables.backend import NftablesBackend
from stockade.backends.nftables.template import shape_key, without_elements, zero_counters
from stockade.model.addresses import Family
from stockade.verify.samples import random_host_policy


def test_shape_ignores_members_and_name_but_not_rules() -> None:
    hp = random_host_policy(random.Random(5), rules=6, peers=8, sets=3)
    backend = NftablesBackend("stockade")
    key = shape_key(backend.render(hp))
    s = hp.sets[0]
    extra = ipaddress.ip_network("10.200.0.7/32" if s.family is Family.V4 else "fd77::7/128")
    other = dataclasses.replace(hp, workload="someone-else",
                                sets=(dataclasses.replace(s, members=(*s.members, extra)), *hp.sets[1:]))
    assert shape_key(backend.render(other)) == key
    fewer = dataclasses.replace(hp, rules=hp.rules[1:])
    assert shape_key(backend.render(fewer)) != key
    assert shape_key(NftablesBackend("stockade", layout="list").render(hp)) != key
    assert shape_key(NftablesBackend("other").render(hp)) != key


def _expr(name: bytes, data: bytes = b"") -> bytes:
    return nest(1, attr(1, name + b"\0"), *((nest(2, data),) if data else ()))


def test_counters_are_zeroed_and_nothing_else_changes() -> None:
    counted = _expr(b"counter", attr(1, (123).to_bytes(8, "big")) + attr(2, (4).to_bytes(8, "big")))
    fresh = _expr(b"counter")
    log = _expr(b"log", attr(1, b"\0\x64"))
    assert zero_counters(log + counted + log) == log + fresh + log
    assert zero_counters(log) == log


def test_without_elements_drops_only_the_named_sets_elements() -> None:
    lines = ("table x", "set a 00", "  element 01", "set b 00", "  element 02", "chain c 00", "  rule 03 ")
    assert without_elements(lines, frozenset({"a"})) == (
        "table x", "set a 00", "set b 00", "  element 02", "chain c 00", "  rule 03 ")
