"""The fast one-address networks (compiler/hostnet.py) are indistinguishable from ipaddress's own."""

from __future__ import annotations

import copy
import pickle
import random
from ipaddress import IPv4Network, IPv6Network, ip_network

import pytest

from stockade.compiler import hostnet
from stockade.compiler.hostnet import host_network_maker, same_network


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
