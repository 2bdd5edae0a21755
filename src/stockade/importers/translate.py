"""Ordered first-match host rules -> Stockade policy, never wider than the original.

Stockade's precedence is override-deny > allow > deny > the mode's default, evaluated on both
sides of a connection. One host's flattened chains (:class:`~stockade.importers.chains.HostRules`)
become, per chain of rules ``r1..rn`` and default ``P``:

* the host's mode: ``full`` when every imported chain defaults to DROP, else ``selective`` with an
  explicit deny-all for the chains that default to DROP; ``visibility`` when something could not
  be expressed (the rules are still written, so raising the mode later enforces them);
* an ACCEPT ``ri`` becomes an allow rule when the mode is full or a later DROP overlaps it;
* a DROP ``rj`` becomes a deny rule when the mode is selective or a later ACCEPT overlaps it; an
  override-deny when a later *emitted* allow overlaps it (the drop came first). An earlier accept
  overlapping an override-deny is then blocked too: reported as approximated (narrower);
* a rule restricted to some of the host's own addresses: ACCEPT left out, DROP kept for all.

Peers are then made label-based (:mod:`stockade.importers.labels`): address groups of single
host addresses become proposed label values; everything else stays an IP list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_network

from stockade.codec.syntax import format_service_entry
from stockade.importers.chains import ANY_ENTRIES, BaseChain, Direction, HostRules, Match, OrderedRule, Verdict
from stockade.importers.labels import propose_labels, safe_name
from stockade.importers.report import VISIBILITY_NOTE, Finding, ImportResult, Origin, Outcome
from stockade.model.addresses import AddressRanges, Family, IPAddress, IPList
from stockade.model.labels import DEFAULT_LABEL_KEYS, Label, LabelKey
from stockade.model.policy import Failsafe, Policy
from stockade.model.rules import AllowRule, ConsumerScope, DenyRule, Ruleset
from stockade.model.selectors import IPListSelector, LabelSelector, Selector
from stockade.model.services import Service, ServiceEntry
from stockade.model.workloads import EnforcementMode, Interface, Workload

HOST_KEY = "host"
GROUP_KEY = "group"
@dataclass(frozen=True)
class Emitted:
    """One Stockade rule to write for one host side."""

    host: str
    direction: Direction
    action: str  # "allow" | "deny" | "override-deny"
    match: Match
    origin: Origin


@dataclass
class _Host:
    rules: HostRules
    addresses: tuple[IPAddress, ...]
    mode: EnforcementMode = EnforcementMode.FULL
    enforce: EnforcementMode = EnforcementMode.FULL  # the mode the rules were written for
    emitted: list[Emitted] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def report(self, outcome: Outcome, origin: Origin, construct: str, note: str) -> None:
        self.findings.append(Finding(outcome, origin, self.rules.host, construct, note))


def _localise(host: _Host, chain: BaseChain) -> list[OrderedRule]:
    """Drop the ``local`` (own-address) condition: exact, left out (accept) or widened (drop)."""
    own = AddressRanges.of(a for a in host.addresses if (a.version == 4) == (chain.family is Family.V4))
    out: list[OrderedRule] = []
    for r in chain.rules:
        local = r.match.local
        if local is None or (not own.is_empty() and own.minus(local).is_empty()):
            out.append(OrderedRule(r.verdict, Match(r.match.family, r.match.peer, None, r.match.entries,
                                                    r.match.peer_names), r.origin, r.text))
            continue
        if r.verdict is Verdict.ACCEPT:
            host.report(Outcome.APPROXIMATED, r.origin, r.text,
                        "matches only some of the host's own addresses; Stockade rules cover all of them: "
                        "the accept is left out (narrower)")
            continue
        host.report(Outcome.APPROXIMATED, r.origin, r.text,
                    "matches only some of the host's own addresses: the drop is kept for all of them (narrower)")
        out.append(OrderedRule(r.verdict, Match(r.match.family, r.match.peer, None, r.match.entries,
                                                r.match.peer_names), r.origin, r.text))
    return out


def _emit_chain(host: _Host, chain: BaseChain) -> None:
    rules = _localise(host, chain)
    everything = Match(chain.family)
    full = host.mode is EnforcementMode.FULL
    what = f"IPv{chain.family.value} {chain.direction.value}"
    if not full and chain.default is Verdict.DROP:
        rules.append(OrderedRule(Verdict.DROP, everything, chain.origin, f"{what} default DROP"))
    if full and chain.default is Verdict.ACCEPT:
        rules.append(OrderedRule(Verdict.ACCEPT, everything, chain.origin, f"{what} default ACCEPT"))
    n = len(rules)
    allow = [False] * n
    for i, r in enumerate(rules):
        if r.verdict is Verdict.ACCEPT:
            allow[i] = full or any(
                rules[j].verdict is Verdict.DROP and rules[j].match.overlaps(r.match) for j in range(i + 1, n)
            )
    for i, r in enumerate(rules):
        if r.verdict is Verdict.ACCEPT:
            if allow[i]:
                host.emitted.append(Emitted(host.rules.host, chain.direction, "allow", r.match, r.origin))
                host.report(Outcome.CARRIED, r.origin, r.text, "allow rule")
            else:
                host.report(Outcome.CARRIED, r.origin, r.text, "nothing later drops it: the mode's default allows it")
            continue
        later_accept = any(rules[j].verdict is Verdict.ACCEPT and rules[j].match.overlaps(r.match)
                           for j in range(i + 1, n))
        if full and not later_accept:
            host.report(Outcome.CARRIED, r.origin, r.text, "nothing later accepts it: the mode's default blocks it")
            continue
        override = any(allow[j] and rules[j].match.overlaps(r.match) for j in range(i + 1, n))
        host.emitted.append(Emitted(host.rules.host, chain.direction, "override-deny" if override else "deny",
                                    r.match, r.origin))
        crossed = [rules[j] for j in range(i) if allow[j] and rules[j].match.overlaps(r.match)]
        if override and crossed:
            firsts = ", ".join(str(c.origin) for c in crossed[:3])
            host.report(Outcome.APPROXIMATED, r.origin, r.text,
                        f"override-deny (a later accept overlaps it); traffic an earlier accept ({firsts}) let "
                        "through is blocked too (narrower)")
        else:
            host.report(Outcome.CARRIED, r.origin, r.text, "override-deny rule" if override else "deny rule")


def _plan_host(rules: HostRules, addresses: tuple[IPAddress, ...]) -> _Host:
    host = _Host(rules, addresses)
    host.findings.extend(rules.findings)
    chains = rules.chains
    host.mode = EnforcementMode.FULL if chains and all(c.default is Verdict.DROP for c in chains) \
        else EnforcementMode.SELECTIVE
    covered = {(c.family, c.direction) for c in chains}
    for family in (Family.V4, Family.V6):
        if family not in rules.families:
            what = "blocked (default deny)" if host.mode is EnforcementMode.FULL else "allowed (default allow)"
            host.report(Outcome.APPROXIMATED, Origin(rules.host), f"IPv{family.value}",
                        f"no IPv{family.value} ruleset was imported for this host: its IPv{family.value} traffic "
                        f"is {what} by the mode")
            continue
        missing = [d.value for d in Direction if (family, d) not in covered]
        if missing and family in rules.families:
            what = "blocked (default deny)" if host.mode is EnforcementMode.FULL else "allowed (default allow)"
            host.report(Outcome.APPROXIMATED, Origin(rules.host), f"IPv{family.value} {'/'.join(missing)}",
                        f"no rules were imported for it: {what} by the mode")
    host.enforce = host.mode
    for chain in chains:
        _emit_chain(host, chain)
    if rules.visibility:
        host.notes.append(f"{VISIBILITY_NOTE} (raise to {host.mode.value} once the report's inexpressible "
                          "constructs are handled)")
        host.mode = EnforcementMode.VISIBILITY
    return host


@dataclass
class _Names:
    services: dict[tuple[ServiceEntry, ...], Service] = field(default_factory=dict)
    ip_lists: dict[tuple[Family, AddressRanges], IPList] = field(default_factory=dict)
    used: set[tuple[str, str]] = field(default_factory=set)

    def unique(self, base: str, kind: str) -> str:
        name, i = base, 2
        while (kind, name) in self.used:
            suffix = f"-{i}"
            name, i = base[: 63 - len(suffix)] + suffix, i + 1
        self.used.add((kind, name))
        return name

    def service(self, entries: tuple[ServiceEntry, ...]) -> str:
        if entries == ANY_ENTRIES:
            return "any"
        if entries not in self.services:
            text = ".".join(_entry_name(e) for e in entries)
            self.services[entries] = Service(self.unique(safe_name(text, "svc"), "svc"), entries, "imported")
        return self.services[entries].name

    def ip_list(self, family: Family, ranges: AddressRanges | None, names: tuple[str, ...]) -> str:
        key = (family, ranges if ranges is not None else AddressRanges.of([ip_network("0.0.0.0/0" if family is Family.V4
                                                                                       else "::/0")]))
        if key not in self.ip_lists:
            nets = key[1].networks(family)
            if ranges is None:
                base = f"any-v{family.value}"
            elif len(names) == 1:
                base = safe_name(names[0], "ips")
            elif len(nets) == 1:
                base = safe_name(f"ips-{nets[0]}", "ips")
            else:
                digest = hashlib.sha256(",".join(map(str, nets)).encode()).hexdigest()[:8]
                base = f"ips-v{family.value}-{digest}"
            self.ip_lists[key] = IPList(self.unique(base, "ipl"), nets, (), "imported")
        return self.ip_lists[key].name


def _entry_name(e: ServiceEntry) -> str:
    text = format_service_entry(e)
    if "/" in text:
        port, proto = text.split("/")
        return f"{proto}-{port}"
    return text.replace(":", "-")


def translate(hosts: Sequence[HostRules], addresses: Mapping[str, tuple[IPAddress, ...]],
              extra_findings: Sequence[Finding] = (), backend: str | None = None) -> ImportResult:
    """Every host's rules as one label-based Stockade policy plus the report."""
    planned = [_plan_host(h, tuple(addresses.get(h.host, ()))) for h in hosts]
    proposal = propose_labels(planned_peers(planned), {h.rules.host: h.addresses for h in planned},
                              {h.rules.host: _open_directions(h) for h in planned})
    names = _Names()
    rulesets: list[Ruleset] = []
    denies: list[DenyRule] = []
    for h in planned:
        me = LabelSelector((Label(HOST_KEY, h.rules.host),))
        allows: list[AllowRule] = []
        for n, e in enumerate(h.emitted):
            peer_sel: Selector
            label = proposal.selectors.get((e.match.family, e.match.peer)) if e.match.peer is not None else None
            if label is not None and (e.action != "allow" or proposal.allow_ok(e.match.family, e.match.peer,
                                                                              e.direction)):
                peer_sel = label
            else:
                peer_sel = IPListSelector(names.ip_list(e.match.family, e.match.peer, e.match.peer_names))
            service = names.service(e.match.entries)
            inbound = e.direction is Direction.INBOUND
            consumers: tuple[Selector, ...] = (peer_sel,) if inbound else (me,)
            providers: tuple[Selector, ...] = (me,) if inbound else (peer_sel,)
            desc = f"imported from {e.origin}"
            if e.action == "allow":
                allows.append(AllowRule(consumers, providers, (service,), ConsumerScope.GLOBAL, desc))
            else:
                denies.append(DenyRule(safe_name(f"import-{h.rules.host}-{n + 1}", "deny"), consumers, providers,
                                       (service,), e.action == "override-deny", desc))
        if allows:
            rulesets.append(Ruleset(safe_name(f"import-{h.rules.host}", "rs"), (), tuple(allows),
                                    f"imported rules of host {h.rules.host}"))
    workloads = [
        Workload(h.rules.host, frozenset({Label(HOST_KEY, h.rules.host), *proposal.host_labels.get(h.rules.host, ())}),
                 (Interface("eth0", h.addresses),) if h.addresses else (), h.mode, backend, " ".join(h.notes))
        for h in planned
    ]
    workloads += proposal.peer_workloads
    findings = [f for h in planned for f in h.findings] + list(extra_findings) + list(proposal.findings)
    keys = tuple(LabelKey(k) for k in (*DEFAULT_LABEL_KEYS, GROUP_KEY, HOST_KEY))
    policy = Policy(
        label_keys=keys,
        label_groups=tuple(sorted(proposal.label_groups)),
        workloads=tuple(sorted(workloads)),
        ip_lists=tuple(sorted(names.ip_lists.values())),
        services=tuple(sorted(names.services.values())),
        rulesets=tuple(sorted(rulesets)),
        deny_rules=tuple(sorted(denies)),
        failsafe=Failsafe(management=()),
    )
    if hosts:
        findings.append(Finding(Outcome.APPROXIMATED, Origin(hosts[0].host), "", "Settings.management",
                                "Stockade's failsafe always allows inbound management ports (default 22/tcp); the "
                                "import sets them to [] so the imported rules alone decide (SSH stays open exactly "
                                "where the original allowed it)"))
    return ImportResult(policy, tuple(sorted(set(findings), key=_finding_key)), proposal.proposed,
                        tuple((h.rules.host, h.enforce) for h in planned))


def _finding_key(f: Finding) -> tuple[int, str, int, str, str, str, str]:
    return (list(Outcome).index(f.outcome), f.origin.file, f.origin.line, f.origin.path, f.construct, f.note, f.host)


def planned_peers(planned: Sequence[_Host]) -> list[tuple[Emitted, str]]:
    return [(e, h.rules.host) for h in planned for e in h.emitted]


def _open_directions(h: _Host) -> frozenset[Direction]:
    """Directions in which the host allows everything (a label on it adds nothing there)."""
    out = set()
    for d in Direction:
        chains = [c for c in h.rules.chains if c.direction is d]
        denies = [e for e in h.emitted if e.direction is d and e.action != "allow"]
        if h.enforce is not EnforcementMode.FULL and not denies and all(c.default is Verdict.ACCEPT for c in chains):
            out.add(d)
    return frozenset(out)

