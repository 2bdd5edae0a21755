"""IPFilter backend runner against a FAKE ipf/ippool (no IPFilter on Linux).

The fake keeps an active and an inactive rule set per family and the loaded pools, refuses
what IPFilter refuses (a rule naming a missing pool, removing a pool still referenced,
creating a pool twice), and can be told to fail a command, so the tests check the apply
sequence: pools first in the other slot, rules into the inactive set, one swap, cleanup, and
a failed load that leaves the active set and its pools untouched.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from stockade.backends.ipfilter.backend import CommandResult, IpfilterBackend
from stockade.backends.ipfilter.render import Slot, port_text, render_ipfilter
from stockade.compiler.ir import HostRule, SetDelta
from stockade.errors import ApplyError, RenderError
from stockade.model import Family
from tests.golden.nft_cases import ALLOW, CASES, FULL, IN, WEB, host, tcp

_POOL_RE = re.compile(r"table role = ipf type = tree number = (\d+)\n\t\{ (.*); \};")


class FakeIpf:
    """A FAKE ipf + ippool + ipfstat with the state those keep in the kernel."""

    def __init__(self) -> None:
        self.active: dict[str, list[str]] = {"4": [], "6": []}
        self.inactive: dict[str, list[str]] = {"4": [], "6": []}
        self.pools: dict[int, set[str]] = {}
        self.log: list[list[str]] = []
        self.fail: set[str] = set()  # e.g. {"ipf -6 -I -f"}

    def _referenced(self) -> set[int]:
        rules = [r for s in (self.active, self.inactive) for fam in s.values() for r in fam]
        return {int(n) for r in rules for n in re.findall(r"pool/(\d+)", r)}

    def __call__(self, argv: Sequence[str]) -> CommandResult:
        argv = list(argv)
        self.log.append(argv)
        key = " ".join(a for a in argv if not a.startswith("/"))
        if any(key.startswith(f) for f in self.fail):
            return CommandResult(1, "", f"injected failure: {key}")
        tool, args = argv[0], argv[1:]
        fam = "6" if "-6" in args else "4"
        if tool == "ippool":
            return self._ippool(args)
        if tool == "ipf":
            if args[-1] == "-Fa":
                self.inactive[fam] = []
            elif "-s" in args:
                self.active, self.inactive = self.inactive, self.active
            elif "-f" in args:
                lines = [ln for ln in Path(args[-1]).read_text().splitlines() if ln and not ln.startswith("#")]
                for ln in lines:
                    for n in re.findall(r"pool/(\d+)", ln):
                        if int(n) not in self.pools:
                            return CommandResult(1, "", f"pool {n} does not exist")
                self.inactive[fam] += lines
            return CommandResult(0, "", "")
        if tool == "ipfstat":
            return CommandResult(0, "\n".join(self.active[fam]), "")
        raise AssertionError(argv)

    def _ippool(self, args: list[str]) -> CommandResult:
        op = args[0]
        if op == "-l":
            text = "\n".join(f"table role = ipf type = tree number = {n}\n\t{{ {'; '.join(sorted(m))}; }};"
                             for n, m in sorted(self.pools.items()))  # fmt: skip
            return CommandResult(0, text, "")
        if op == "-f":
            for number, body in _POOL_RE.findall(Path(args[1]).read_text()):
                if int(number) in self.pools:
                    return CommandResult(1, "", f"pool {number} exists")
                self.pools[int(number)] = set(body.split("; "))
            return CommandResult(0, "", "")
        number = int(args[args.index("-m") + 1])
        if op == "-A":
            if number in self.pools:
                return CommandResult(1, "", "exists")
            self.pools[number] = set()
        elif op == "-R":
            if number not in self.pools or number in self._referenced():
                return CommandResult(1, "", "busy or missing")
            del self.pools[number]
        elif op in ("-a", "-r"):
            if number not in self.pools:
                return CommandResult(1, "", "no such pool")
            member = args[args.index("-i") + 1]
            if op == "-a":
                self.pools[number].add(member)
            elif member in self.pools[number]:
                self.pools[number].remove(member)
            else:
                return CommandResult(1, "", "no such node")
        return CommandResult(0, "", "")


def _case(name: str) -> object:
    return next(c for c in CASES if c.name == name).policy


def test_apply_alternates_slots_and_cleans_up() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(executor=fake)
    art = backend.render(_case("full_basic"))  # type: ignore[arg-type]
    backend.apply(art)
    assert set(fake.pools) == set(art.pool_numbers(Slot.A))
    assert fake.active["4"] == [ln for ln in art.ipf_conf(Family.V4, Slot.A).splitlines() if not ln.startswith("#")]
    assert fake.inactive == {"4": [], "6": []}
    # the swap is the only command that puts rules in force
    swaps = [i for i, a in enumerate(fake.log) if a == ["ipf", "-s"]]
    loads = [i for i, a in enumerate(fake.log) if a[0] == "ipf" and "-f" in a]
    pool_loads = [i for i, a in enumerate(fake.log) if a[:2] == ["ippool", "-f"]]
    assert len(swaps) == 1 and max(pool_loads) < min(loads) < max(loads) < swaps[0]

    art2 = backend.render(_case("deny_crossed_by_allow"))  # type: ignore[arg-type]
    backend.apply(art2)
    assert set(fake.pools) == set(art2.pool_numbers(Slot.B)), "old slot's pools removed after the swap"
    assert all("pool/2" in ln for ln in fake.active["4"] if "pool/" in ln)
    backend.apply(backend.render(_case("full_basic")))  # type: ignore[arg-type]
    assert set(fake.pools) == set(art.pool_numbers(Slot.A))


def test_failed_load_keeps_active_rules_and_pools() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(executor=fake)
    backend.apply(backend.render(_case("full_basic")))  # type: ignore[arg-type]
    before_rules = {k: list(v) for k, v in fake.active.items()}
    before_pools = {k: set(v) for k, v in fake.pools.items()}
    fake.fail = {"ipf -6 -I -f"}
    with pytest.raises(ApplyError, match="injected failure"):
        backend.apply(backend.render(_case("selective")))  # type: ignore[arg-type]
    assert fake.active == before_rules
    assert fake.pools == before_pools, "the new slot's pools are removed again"
    assert fake.inactive == {"4": [], "6": []}
    fake.fail = {"ipf -s"}
    with pytest.raises(ApplyError):
        backend.apply(backend.render(_case("selective")))  # type: ignore[arg-type]
    assert fake.active == before_rules and fake.pools == before_pools


def test_empty_pools_are_created_with_ippool_a() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(executor=fake)
    art = backend.render(_case("empty_sets"))  # type: ignore[arg-type]
    backend.apply(art)
    creates = [a for a in fake.log if a[:2] == ["ippool", "-A"]]
    assert len(creates) == len(art.pools) == 2
    assert not any(a[:2] == ["ippool", "-f"] for a in fake.log)
    assert all(not m for m in fake.pools.values())


def test_delta_changes_pool_members_only() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(executor=fake)
    with pytest.raises(ApplyError, match="apply a full policy first"):
        backend.apply_delta((SetDelta(WEB[0].name, Family.V4, (ipaddress.ip_network("10.0.0.50/32"),), ()),))
    art = backend.render(_case("full_basic"))  # type: ignore[arg-type]
    backend.apply(art)
    rules_before = {k: list(v) for k, v in fake.active.items()}
    n = Slot.A.value + art.pool(WEB[0].name, Family.V4).index
    backend.apply_delta(
        (
            SetDelta(WEB[0].name, Family.V4, (ipaddress.ip_network("10.0.0.50/32"),),
                     (ipaddress.ip_network("10.0.0.11/32"),)),
        )
    )  # fmt: skip
    assert fake.active == rules_before
    assert fake.pools[n] == {"10.0.0.12/31", "10.0.0.50/32"}
    adds = [i for i, a in enumerate(fake.log) if a[:2] == ["ippool", "-a"]]
    dels = [i for i, a in enumerate(fake.log) if a[:2] == ["ippool", "-r"]]
    assert adds and dels and max(adds) < min(dels)


def test_inline_v6_delta_reloads() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(inline_v6=True, executor=fake)
    backend.apply(backend.render(_case("full_basic")))  # type: ignore[arg-type]
    assert not any("fd00" in " ".join(m) for m in fake.pools.values())
    backend.apply_delta((SetDelta(WEB[0].name, Family.V6, (ipaddress.ip_network("fd00::50/128"),), ()),))
    assert any("fd00::50/128" in ln for ln in fake.active["6"])


def test_remove_swaps_in_empty_set_and_drops_pools() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(executor=fake)
    backend.apply(backend.render(_case("full_basic")))  # type: ignore[arg-type]
    assert backend.read_back()
    backend.remove()
    assert fake.active == {"4": [], "6": []} and fake.pools == {}
    assert backend.read_back() == ""


def test_idle_applies_an_empty_set() -> None:
    fake = FakeIpf()
    backend = IpfilterBackend(executor=fake)
    backend.apply(backend.render(_case("full_basic")))  # type: ignore[arg-type]
    backend.apply(backend.render(_case("idle")))  # type: ignore[arg-type]
    assert fake.active == {"4": [], "6": []} and fake.pools == {}


def test_port_text_edges() -> None:
    assert port_text(80, 80) == "port = 80"
    assert port_text(0, 1023) == "port <= 1023"
    assert port_text(1024, 65535) == "port >= 1024"
    assert port_text(8000, 8100) == "port 7999 >< 8101"
    assert port_text(0, 65535) == ""


def test_hostile_rule_id_and_interface_are_refused() -> None:
    hp = host(FULL, [HostRule(ALLOW, IN, "ruleset/x\npass in all/0", WEB[0].name, (tcp(80),))], [WEB])
    with pytest.raises(RenderError, match="ipf comment"):
        render_ipfilter(hp)
    with pytest.raises(RenderError, match="loopback"):
        render_ipfilter(_case("full_basic"), loopback="lo0 all; pass")  # type: ignore[arg-type]
