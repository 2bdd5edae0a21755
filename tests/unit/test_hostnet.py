"""The compiler's constructor short-cuts (compiler/hostnet.py, ir.make_host_rule) make what the constructors make."""

from __future__ import annotations

import copy
import pickle
import random
from dataclasses import fields
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import pytest

from stockade.compiler import hostnet
from stockade.compiler.hostnet import host_network_maker, same_network
from stockade.compiler.ir import Direction, HostRule, make_host_rule
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry


@pytest.mark.parametrize("v4", [True, False])
def test_fast_maker_is_used_and_matches_the_constructor(v4: bool) -> None:
    make = host_network_maker(v4)
    assert make.__qualname__.startswith("_fast_v")  # the speed-up is in effect on this Python
    bits = 32 if v4 else 128
    cls = IPv4Network if v4 else IPv6Network
    rng = random.Random(5)
    for a in [0, 1, 2**bits - 1, *(rng.getrandbits(bits) for _ in range(500))]:
        made, real = make(a), cls((a, bits))
        assert same_network(made, real)
        assert made.network_address.version == real.network_address.version
        assert made.is_private == real.is_private and made.exploded == real.exploded
        assert ip_network(str(made)) == made
        assert pickle.loads(pickle.dumps(made)) == real
        assert copy.copy(made) == real
        assert {made: 1}[real] == 1 and sorted([real, made]) == [real, made]


def test_falls_back_to_the_constructor_when_the_check_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostnet, "same_network", lambda made, real: False)
    make = host_network_maker(True)
    assert not make.__qualname__.startswith("_fast_v")
    assert make(0x0A000001) == IPv4Network("10.0.0.1/32")


def test_a_different_network_is_told_apart() -> None:
    assert not same_network(host_network_maker(True)(1), IPv4Network((2, 32)))
    assert not same_network(host_network_maker(False)(1), IPv4Network((1, 32)))


def test_address_int_is_int() -> None:
    assert hostnet.address_int is not int  # the fast path is in effect on this Python
    rng = random.Random(9)
    addresses: list[IPv4Address | IPv6Address] = [IPv4Address(0), IPv4Address(2**32 - 1), IPv6Address("fe80::1%eth0")]
    addresses += [IPv4Address(rng.getrandbits(32)) for _ in range(200)]
    addresses += [IPv6Address(rng.getrandbits(128)) for _ in range(200)]
    for a in addresses:
        assert hostnet.address_int(a) == int(a)


def test_make_host_rule_equals_the_dataclass() -> None:
    svc = (ServiceEntry(Proto.TCP, 80, 80),)
    for enc in (False, True):
        made = make_host_rule(Action.ALLOW, Direction.OUTBOUND, "ruleset/x/0", "pabc", svc, enc)
        real = HostRule(Action.ALLOW, Direction.OUTBOUND, "ruleset/x/0", "pabc", svc, enc)
        assert made == real and hash(made) == hash(real) and repr(made) == repr(real)
        assert [getattr(made, f.name) for f in fields(HostRule)] == [getattr(real, f.name) for f in fields(HostRule)]


def test_workload_addresses_is_the_models_answer() -> None:
    """The short-cut for one interface with one address, or one v4 then one v6 address, returns
    exactly ``Workload.addresses``; any other shape (duplicates, v6 first, two interfaces, scoped
    v6) goes to the model. Compared with a fresh workload each time (``addresses`` is cached)."""
    from stockade.compiler.hostnet import workload_addresses
    from stockade.model import EnforcementMode, Interface, Workload

    rng = random.Random(19)
    pool: list[IPv4Address | IPv6Address] = [
        IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), IPv4Address("9.9.9.9"),
        IPv6Address("fd00::1"), IPv6Address("fd00::2"), IPv6Address("fe80::1%eth0"), IPv6Address("fe80::1"),
    ]
    shortcut = 0
    for _ in range(3000):
        ifaces = tuple(Interface(f"eth{i}", tuple(rng.choice(pool) for _ in range(rng.randrange(0, 4))))
                       for i in range(rng.choice((1, 1, 1, 2))))

        got = workload_addresses(Workload("w", frozenset(), ifaces, EnforcementMode.FULL))
        want = Workload("w", frozenset(), ifaces, EnforcementMode.FULL).addresses  # a fresh one: not cached
        assert got == want and [str(a) for a in got] == [str(a) for a in want]
        shortcut += len(ifaces) == 1 and got is ifaces[0].addresses
    assert shortcut > 300  # the short-cut was taken
