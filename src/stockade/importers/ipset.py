"""``ipset save`` output: the named address sets ``-m set --match-set`` refers to.

Only address sets (``hash:ip``, ``hash:net``, ``bitmap:ip``) carry over; ``nomatch`` entries of a
``hash:net`` are exclusions. A set of another type (``hash:ip,port``...) is kept by name with no
addresses and flagged, so a rule that uses it is reported as not expressible.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from stockade.codec.syntax import BadValue, parse_network
from stockade.importers.report import Finding, Origin, Outcome
from stockade.importers.source import Source
from stockade.model.addresses import AddressRanges, Family, IPNetwork

ADDRESS_TYPES = ("hash:ip", "hash:net", "bitmap:ip")


@dataclass
class IPSet:
    name: str
    kind: str
    family: Family
    include: list[IPNetwork] = field(default_factory=list)
    exclude: list[IPNetwork] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.kind in ADDRESS_TYPES

    def ranges(self) -> AddressRanges:
        return AddressRanges.of(self.include).minus(AddressRanges.of(self.exclude))


def looks_like_ipset(text: str) -> bool:
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            return line.startswith(("create ", "add "))
    return False


def parse_ipset(source: Source, host: str) -> tuple[dict[str, IPSet], list[Finding]]:
    sets: dict[str, IPSet] = {}
    findings: list[Finding] = []
    for n, line in enumerate(source.text.splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        origin = Origin(source.name, n)
        try:
            words = shlex.split(text)
        except ValueError as exc:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80], f"cannot split the line: {exc}"))
            continue
        if words[0] == "create" and len(words) >= 3:
            family = Family.V6 if "inet6" in words[3:] else Family.V4
            sets[words[1]] = IPSet(words[1], words[2], family)
            if words[2] not in ADDRESS_TYPES:
                findings.append(Finding(Outcome.NOT_EXPRESSIBLE, origin, host, f"ipset {words[1]} ({words[2]})",
                                        "only address sets (hash:ip, hash:net, bitmap:ip) carry over"))
        elif words[0] == "add" and len(words) >= 3:
            target = sets.get(words[1])
            if target is None:
                findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80], f"no set named {words[1]!r}"))
                continue
            if not target.usable:
                continue
            try:
                net = parse_network(words[2]) if "/" in words[2] else parse_network(words[2].split("-")[0])
                if "-" in words[2] and "/" not in words[2]:
                    raise BadValue(f"address ranges ({words[2]}) are not read; write them as CIDRs")
            except BadValue as exc:
                findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80], str(exc)))
                continue
            (target.exclude if "nomatch" in words[3:] else target.include).append(net)
        else:
            findings.append(Finding(Outcome.BAD_INPUT, origin, host, text[:80], "expected `create` or `add`"))
    return sets, findings
