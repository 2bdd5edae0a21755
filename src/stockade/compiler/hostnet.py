"""One-address networks (/32, /128) and address ints made without ``ipaddress``'s parsing constructor.

A full compile at 125,000 workloads makes 250,000 of them (``members.NetworkCache``), and
``IPv4Network((a, 32))`` costs 2-4 us: it splits and re-checks its argument, looks the mask up,
recomputes the network address and masks it for ``strict``. For a one-address network all of
that is known in advance, so ``host_network_maker`` fills the same attributes directly (about
half the time).

That relies on the attributes ``ipaddress`` gives a network (they have been the same since
Python 3.7), so the maker *checks itself* when it is made: a network built both ways must have
the same attributes, compare and hash equal, print the same and list the same hosts. If
anything differs (a future ``ipaddress``), it falls back to the constructor, so a mismatch
costs speed, never a wrong network. ``tests/unit/test_hostnet.py`` checks the same.

``address_int`` is ``int(address)`` read from the same slot ``__int__`` returns (checked the same
way): 250,000 Python-level ``__int__`` calls fewer per full compile.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from operator import attrgetter
from typing import Any

from stockade.model.addresses import IPAddress, IPNetwork
from stockade.model.workloads import Workload

_new = object.__new__


def _fast_v4() -> Callable[[int], IPNetwork]:
    set_ip = getattr(IPv4Address, "_ip").__set__  # noqa: B009 (a slot typeshed does not name)
    mask = IPv4Network((0, 32)).netmask

    def make(a: int) -> IPNetwork:
        addr = _new(IPv4Address)
        set_ip(addr, a)
        net = _new(IPv4Network)
        net.__dict__.update({"network_address": addr, "netmask": mask, "_prefixlen": 32,
                             "hosts": lambda: [IPv4Address(a)]})
        return net

    return make


def _fast_v6() -> Callable[[int], IPNetwork]:
    set_ip = getattr(IPv6Address, "_ip").__set__  # noqa: B009
    set_scope = getattr(IPv6Address, "_scope_id").__set__  # noqa: B009
    mask = IPv6Network((0, 128)).netmask

    def make(a: int) -> IPNetwork:
        addr = _new(IPv6Address)
        set_ip(addr, a)
        set_scope(addr, None)
        net = _new(IPv6Network)
        net.__dict__.update({"network_address": addr, "netmask": mask, "_prefixlen": 128,
                             "hosts": lambda: [IPv6Address(a)]})
        return net

    return make


def _address_int() -> Callable[[IPv4Address | IPv6Address], int]:
    """``int(address)`` without a Python-level ``__int__`` call (the ``_ip`` slot it returns), when
    that slot holds exactly what ``int()`` gives; else ``int`` itself."""
    fast: Callable[[Any], int] = attrgetter("_ip")
    try:
        probes = [IPv4Address(0), IPv4Address(2**32 - 1), IPv6Address(1), IPv6Address(2**128 - 1),
                  IPv6Address("fe80::1%eth0")]
        if all(fast(a) == int(a) for a in probes):
            return fast
    except AttributeError:
        pass
    return int


address_int = _address_int()


def same_network(made: Any, real: Any) -> bool:
    """Whether two networks are indistinguishable: attributes, equality, hash, text, hosts."""
    return (
        type(made) is type(real)
        and vars(made).keys() == vars(real).keys()
        and made == real
        and hash(made) == hash(real)
        and str(made) == str(real)
        and repr(made) == repr(real)
        and made.hosts() == real.hosts()
        and made.network_address == real.network_address
        and hash(made.network_address) == hash(real.network_address)
        and str(made.network_address) == str(real.network_address)
        and made.broadcast_address == real.broadcast_address
        and made.num_addresses == real.num_addresses
    )


def host_network_maker(v4: bool) -> Callable[[int], IPNetwork]:
    """A function address -> its /32 (``v4``) or /128 network, the fast one when it checks out."""
    cls: type[IPv4Network] | type[IPv6Network] = IPv4Network if v4 else IPv6Network
    bits = 32 if v4 else 128

    def slow(a: int) -> IPNetwork:
        return cls((a, bits))

    try:
        fast = _fast_v4() if v4 else _fast_v6()
        probes = (0, 1, 0x0A000001, 2**32 - 1) if v4 else (0, 1, 0xFD00 << 112 | 5, 2**128 - 1)
        if all(same_network(fast(a), slow(a)) for a in probes):
            return fast
    except (AttributeError, TypeError):  # a layout without these slots or attributes
        pass
    return slow


_ADDRESS_TYPES = (IPv4Address, IPv6Address)


def workload_addresses(w: Workload) -> tuple[IPAddress, ...]:
    """``w.addresses`` (every address of every interface, sorted, v4 first, no duplicates).

    The usual workload has one interface holding one address, or one IPv4 then one IPv6 address:
    that tuple already is the answer, so it is returned as is. Building it through the model's
    ``cached_property`` (a lock, a dict keyed by version and value, a sort) was a tenth of a full
    compile at 125,000 workloads. Anything else (more interfaces, more addresses, another order,
    a subclass) gets the model's own answer.
    """
    ifs = w.interfaces
    if len(ifs) == 1:
        a = ifs[0].addresses
        if type(a) is tuple:
            n = len(a)
            if n == 2 and type(a[0]) is IPv4Address and type(a[1]) is IPv6Address:
                return a
            if n == 1 and type(a[0]) in _ADDRESS_TYPES:
                return a
    return w.addresses
