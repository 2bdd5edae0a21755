"""The fast iptables read-back against its references, without a kernel.

* rule lines parsed per part, once per distinct part (the memo), give the same ruleset as every
  line parsed whole, on random policies of both layouts (with and without encrypted rules), and on
  lines built to make splitting at `` -m `` go wrong: each either parses the same or is refused
  with the same error;
* the ipset netlink decoder: its fixed-shape fast path equals the general attribute walk on random
  members; members or headers it does not model leave the set out, and a rule using such a set is
  refused, naming the reason; a set split over several dump messages is one set.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from stockade.backends.iptables.ipset_netlink import element_message
from stockade.backends.iptables.model import Layout
from stockade.backends.iptables.render import render_iptables
from stockade.backends.nfnetlink import attr, nest
from stockade.errors import UnmodelledConstructError
from stockade.model.addresses import Family, merge_ranges
from stockade.verify import ipset_readback as S
from stockade.verify.ipt_readback import parse_filter, parse_ipset_save, parse_iptables_sets
from stockade.verify.loaded import AddressSet
from stockade.verify.offline import iptables_save_texts
from stockade.verify.samples import random_host_policy

WG = "wgstk0"


def _both(text: str, family: Family, sets: dict[str, AddressSet], wg: str | None = None) -> None:
    """The memo and the whole-line parse agree: the same result, or the same refusal."""
    outcomes: list[tuple[str, object]] = []
    for whole in (False, True):
        try:
            outcomes.append(("ok", parse_filter(text, family, sets, wg, whole_lines=whole)))
        except UnmodelledConstructError as exc:
            outcomes.append(("refused", str(exc)))
    assert outcomes[0] == outcomes[1]


@pytest.mark.parametrize("seed", range(40))
def test_memo_parse_equals_whole_lines_on_random_policies(seed: int) -> None:
    rng = random.Random(seed)
    hp = random_host_policy(rng, rules=rng.choice((4, 12, 40)), peers=rng.choice((3, 30)),
                            encrypted=0.3 if seed % 4 == 0 else 0.0)
    wg = WG if seed % 4 == 0 else None
    layout = Layout.LOOKUP if seed % 2 else Layout.LIST
    v4, v6, ipsets = iptables_save_texts(render_iptables(hp, layout=layout, wg_interface=wg))
    sets = parse_ipset_save(ipsets)
    for text, family in ((v4, Family.V4), (v6, Family.V6)):
        fast = parse_filter(text, family, sets, wg)
        assert fast == parse_filter(text, family, sets, wg, whole_lines=True)
        assert fast[0].chains  # not vacuous


@pytest.mark.parametrize("line", [
    '-p tcp -m tcp --dport 22 -m comment --comment "x -m tcp --dport 99" -j RETURN',  # a quoted " -m "
    '-p tcp ! -m tcp --dport 22 -j RETURN',  # a "!" before -m
    '-p tcp -m tcp ! -m comment --comment a -j RETURN',
    '-j ACCEPT -m tcp --dport 22',  # a target before a module
    '-p tcp -j RETURN -m tcp --dport 22',
    '-j NFLOG --nflog-prefix -m tcp --dport 22',  # a value "-m": taken by the option before it
    '-j NFLOG --nflog-prefix -m --nflog-group 3',
    '-p tcp -m tcp --dport -m comment --comment x -j RETURN',
    '-p tcp -m tcp --tcp-flags SYN -m comment --comment x -j RETURN',
    '-m comment --comment -m -j RETURN',
    '-m connbytes --connbytes 1 -m tcp -p tcp --dport 5 -j RETURN',  # counts deciding a verdict
    '-m connbytes --connbytes 1 -m comment --comment x -j NFLOG --nflog-group 1',
    '-m hashlimit --hashlimit-upto 1 -j RETURN -m comment --comment x',
    '-p tcp -m tcp --dport 22 -m comment --comment "a" -m tcp --dport 23 -j RETURN',
    '-p tcp -m tcp --dport 22 -m tcp -j RETURN',
    '-m comment --comment "it\'s" -j RETURN',  # quoting left to shlex
    '-s 10.0.0.0/8 -m set --match-set NOPE src -j RETURN',
    "-p tcp -m tcp --dport 22 -m  comment --comment x -j RETURN",  # two spaces
    '-p tcp -m tcp --dport 22 -j RETURN !',
])
def test_memo_parse_equals_whole_lines_on_awkward_lines(line: str) -> None:
    hp = random_host_policy(random.Random(3))
    v4, _, ipsets = iptables_save_texts(render_iptables(hp))
    sets = parse_ipset_save(ipsets)
    text = v4.replace("COMMIT", f"-A STOCKADE-IN {line}\n-A STOCKADE-IN {line}\nCOMMIT")
    _both(text, Family.V4, sets)


# ---- the ipset decoder -----------------------------------------------------------------


def _member(net: str) -> bytes:
    """One member as the kernel lists it: the DATA nest of an add message (same layout)."""
    msg = element_message(9, "s", ipaddress.ip_network(net), 1)
    return msg[16 + 4 + 8 + 8:]  # nlmsghdr, nfgenmsg, PROTOCOL, SETNAME("s")


def _dump(name: str, type_name: bytes, family: int, header: bytes, adts: list[bytes]) -> list[bytes]:
    """Dump messages' payloads (after nlmsghdr) of one set: header on the first only."""
    out = []
    for i, adt in enumerate(adts or [b""]):
        body = attr(1, b"\x06") + attr(2, name.encode() + b"\0")
        if i == 0:
            body += attr(3, type_name + b"\0") + attr(5, bytes([family])) + attr(4, b"\x07") + nest(7, header)
        if adt:
            body += nest(8, adt)
        out.append(struct.pack("!BBH", 2, 0, 0) + body)
    return out


BENIGN = attr(18 | 0x4000, struct.pack("!I", 1024)) + attr(19 | 0x4000, struct.pack("!I", 65536))


def test_fast_and_slow_member_decoding_agree() -> None:
    rng = random.Random(5)
    for family, bits in ((Family.V4, 32), (Family.V6, 128)):
        for _ in range(30):
            nets = []
            for _ in range(rng.randint(1, 60)):
                plen = rng.randint(1, bits)
                value = rng.getrandbits(bits) & ~((1 << (bits - plen)) - 1)
                nets.append(str((ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network)((value, plen))))
            adt = b"".join(_member(n) for n in nets)
            fast = S._members_fast(adt, family)
            assert fast is not None
            assert fast == S._members_slow(adt, family)
            expected = merge_ranges(
                (int(ipaddress.ip_network(n).network_address), int(ipaddress.ip_network(n).broadcast_address))
                for n in nets
            )
            assert S.decode(S.parse_dump(_dump("s", b"hash:net", 2 if bits == 32 else 10, BENIGN, [adt]))["s"]
                            ).ranges == expected


def test_a_set_over_several_messages_is_one_set() -> None:
    a, b = _member("10.0.0.0/8"), _member("192.168.1.1/32")
    dumps = S.parse_dump(_dump("s", b"hash:net", 2, BENIGN, [a, b]))
    assert list(dumps) == ["s"]
    assert S.decode(dumps["s"]).ranges == ((0x0A000000, 0x0AFFFFFF), (0xC0A80101, 0xC0A80101))


NOMATCH = attr(8 | 0x4000, struct.pack("!I", 4))  # IPSET_ATTR_CADT_FLAGS: IPSET_FLAG_NOMATCH
TIMEOUT = attr(6 | 0x4000, struct.pack("!I", 60))


@pytest.mark.parametrize(("type_name", "header", "member", "why"), [
    (b"hash:net", BENIGN, nest(7, nest(1, attr(1, b"\n\0\0\0")), attr(3, b"\x08"), NOMATCH),
     "member attribute 8"),  # a nomatch member
    (b"hash:net", BENIGN + TIMEOUT, _member("10.0.0.0/8"), "header attributes \\[6\\]"),
    (b"hash:net", BENIGN + attr(20, b"\x18"), _member("10.0.0.0/8"), "header attributes \\[20\\]"),  # netmask
    (b"hash:net", BENIGN + attr(8 | 0x4000, struct.pack("!I", 8)), _member("10.0.0.0/8"), "header attributes"),
    (b"bitmap:ip", BENIGN, _member("10.0.0.0/8"), "type 'bitmap:ip'"),
    (b"hash:net,port", BENIGN, _member("10.0.0.0/8"), "type"),
    (b"hash:net", BENIGN, nest(7, nest(1, attr(1, b"\n\0\0\0")), attr(3, b"\x08"), attr(6 | 0x4000, b"\0\0\0\x05")),
     "member attribute 6"),  # an element timeout
    (b"hash:net", BENIGN, nest(7, nest(1, attr(2, b"\0" * 16)), attr(3, b"\x08")), "another shape"),  # v6 in v4
    (b"hash:net", BENIGN, nest(7, nest(1, attr(1, b"\n\0\0\0")), attr(3, b"\x21")), "bad prefix"),
])
def test_unmodelled_sets_are_left_out_and_refused_when_used(type_name: bytes, header: bytes, member: bytes,
                                                           why: str) -> None:
    dumps = S.parse_dump(_dump("STOCKADE-bad-v4", type_name, 2, header, [member]))
    read = S.RangeCache().decode(None, dumps)
    assert "STOCKADE-bad-v4" not in read.sets
    assert read.unmodelled["STOCKADE-bad-v4"]
    with pytest.raises(S.Unmodelled, match=why):
        S.decode(dumps["STOCKADE-bad-v4"])
    hp = random_host_policy(random.Random(3))
    v4, v6, _ = iptables_save_texts(render_iptables(hp))
    used = next(line for line in v4.splitlines() if "--match-set" in line).split("--match-set ")[1].split()[0]
    v4 = v4.replace(used + " ", "STOCKADE-bad-v4 ", 1)
    with pytest.raises(UnmodelledConstructError, match="STOCKADE-bad-v4"):
        parse_iptables_sets(v4, v6, read.sets, unmodelled=read.unmodelled)


def test_an_unknown_top_level_attribute_leaves_the_set_out() -> None:
    payload = _dump("s", b"hash:net", 2, BENIGN, [_member("10.0.0.0/8")])[0] + attr(11, b"\0\x01")  # INDEX
    read = S.RangeCache().decode(None, S.parse_dump([payload]))
    assert read.sets == {} and "attributes [11]" in read.unmodelled["s"]


def test_the_range_cache_hands_out_the_same_object_only_for_the_same_bytes() -> None:
    cache = S.RangeCache()
    first = cache.decode("ns", S.parse_dump(_dump("s", b"hash:net", 2, BENIGN, [_member("10.0.0.0/8")])))
    again = cache.decode("ns", S.parse_dump(_dump("s", b"hash:net", 2, BENIGN, [_member("10.0.0.0/8")])))
    assert again.sets["s"] is first.sets["s"]
    changed = cache.decode("ns", S.parse_dump(_dump("s", b"hash:net", 2, BENIGN, [_member("10.0.0.0/9")])))
    assert changed.sets["s"].ranges == ((0x0A000000, 0x0A7FFFFF),)
    other_type = cache.decode("ns", S.parse_dump(_dump("s", b"hash:ip", 2, BENIGN, [_member("10.0.0.0/9")])))
    assert other_type.sets["s"] is not changed.sets["s"]


def test_the_range_cache_keeps_a_bounded_number_of_namespaces() -> None:
    cache = S.RangeCache()
    dump = S.parse_dump(_dump("s", b"hash:net", 2, BENIGN, [_member("10.0.0.0/8")]))
    first = cache.decode("ns-0", dump)
    for i in range(1, S.NAMESPACES_KEPT + 1):
        cache.decode(f"ns-{i}", dump)
    assert cache.decode("ns-0", dump).sets["s"] is not first.sets["s"]  # ns-0 was the oldest: let go
    assert len(cache._by_netns) == S.NAMESPACES_KEPT
