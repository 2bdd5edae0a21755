"""Policy suggestions: observed connections of one app group turned into label-level allow rules.

For the app group G (the workloads whose grouping labels, default ``app`` + ``env``, have the
given values) the suggestions form one ruleset scoped to G that allows, in full mode, the
connections observed into G and from G to unmanaged addresses:

* inside G: ``{role: r1} -> {role: r2}`` (intra-scope);
* from another app group: the peer's class ``{app, env, role}`` as an extra-scope consumer;
* from or to unmanaged addresses: an existing IP list when one holds the address and no
  managed workload (the most specific such list), else a new IP list of the addresses seen;
* each rule's ports as one service: an existing service with exactly those entries, else a
  new one.

A workload lacking a label is matched by excluding every known value of that key, so a
suggested selector never widens to workloads the traffic did not speak for. Connections from
G to workloads of another group are listed under ``elsewhere``: a ruleset may only allow
providers inside its own scope, so they belong to that group's suggestions.

Rules are merged exactly: first the consumers of one (provider, ports) pair are joined, then
the providers of one (consumers, ports) pair, so every consumer x provider x port a rule
allows was observed (at label level). Connections the policy already allows when every
workload is in full mode (rules or failsafe) are skipped unless asked for.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from stockade.errors import Issue, NotFoundError, ValidationError
from stockade.evaluator import Evaluator, Verdict
from stockade.model.addresses import IPAddress, IPList
from stockade.model.labels import Label
from stockade.model.policy import Policy
from stockade.model.rules import AllowRule, ConsumerScope, Ruleset
from stockade.model.selectors import ALL_WORKLOADS, IPListSelector, LabelSelector, Selector
from stockade.model.services import Proto, Service, ServiceEntry
from stockade.model.workloads import EnforcementMode, Workload
from stockade.visibility.appmap import DEFAULT_GROUP_KEYS, group_id, group_values
from stockade.visibility.flows import Connection, Resolver

DEFAULT_ROLE_KEY = "role"
PREFIX = "sugg"


@dataclass(frozen=True)
class SuggestedRule:
    id: str  # stable: hash of the rule's content
    consumers: tuple[Selector, ...]
    providers: tuple[Selector, ...]
    service: str  # service name (existing, or one of Suggestions.services)
    entries: tuple[ServiceEntry, ...]
    consumers_scope: ConsumerScope
    connections: int  # observed connections this rule covers
    count: int  # times they were seen

    def to_rule(self) -> AllowRule:
        return AllowRule(self.consumers, self.providers, (self.service,), self.consumers_scope,
                         f"suggested from {self.connections} observed connection(s)")


@dataclass(frozen=True)
class Elsewhere:
    """Connections from the group to another app group: that group's suggestions cover them."""

    group: str  # node id of the providing group
    connections: int


@dataclass(frozen=True)
class Suggestions:
    group: str  # node id, e.g. "group:app=shop,env=prod"
    scope: LabelSelector
    ruleset: str  # name of the ruleset accepting creates
    rules: tuple[SuggestedRule, ...]
    services: tuple[Service, ...]  # new services the rules need
    ip_lists: tuple[IPList, ...]  # new IP lists the rules need
    considered: int  # connections into the group or from it to unmanaged peers
    already_allowed: int  # ... of which the policy allows already (skipped)
    elsewhere: tuple[Elsewhere, ...]


@dataclass(frozen=True)
class Accepted:
    """The draft objects that accepting some suggested rules creates."""

    ruleset: Ruleset
    services: tuple[Service, ...]
    ip_lists: tuple[IPList, ...]


# ---- vocabulary ------------------------------------------------------------------------------


def known_values(policy: Policy, key: str) -> tuple[str, ...]:
    """Every value of ``key`` that is declared or carried by a workload."""
    found: set[str] = set()
    for k in policy.label_keys:
        if k.name == key:
            found |= set(k.allowed)
    for w in policy.workloads:
        v = w.label(key)
        if v is not None:
            found.add(v)
    return tuple(sorted(found))


class _Vocabulary:
    def __init__(self, policy: Policy, keys: Sequence[str]) -> None:
        self.values = {k: known_values(policy, k) for k in keys}

    def class_selector(self, labels: frozenset[Label], keys: Sequence[str]) -> LabelSelector:
        """Require the labels of ``keys`` present; exclude every known value of those absent."""
        have = {lab.key: lab for lab in labels}
        require = tuple(sorted(have[k] for k in keys if k in have))
        exclude = tuple(sorted(Label(k, v) for k in keys if k not in have for v in self.values.get(k, ())))
        return LabelSelector(require=require, exclude=exclude)


@dataclass(frozen=True, order=True)
class _Addr:
    """An unmanaged address to be bundled into a new IP list."""

    version: int
    value: int
    text: str


_Item = Selector | _Addr


def _item_key(item: _Item) -> tuple[int, str]:
    if isinstance(item, _Addr):
        return 2, f"{item.version}:{item.value:040x}"
    if isinstance(item, IPListSelector):
        return 1, item.canonical()
    return 0, item.canonical()


def _addr(a: IPAddress) -> _Addr:
    return _Addr(a.version, int(a), str(a))


def _entry(c: Connection) -> ServiceEntry:
    k = c.key
    if k.proto is Proto.ANY:
        return ServiceEntry(Proto.ANY)
    if k.port is None:
        return ServiceEntry(k.proto)
    return ServiceEntry(k.proto, k.port, k.port)


def _normal(entries: Iterable[ServiceEntry]) -> tuple[ServiceEntry, ...]:
    """Entries sorted, ports of one protocol merged into ranges; port-less entries absorb ported ones."""
    by_proto: dict[Proto, list[tuple[int, int]]] = {}
    whole: set[Proto] = set()
    for e in entries:
        if e.first is None:
            whole.add(e.proto)
        else:
            by_proto.setdefault(e.proto, []).append((e.first, e.last if e.last is not None else e.first))
    if Proto.ANY in whole:
        return (ServiceEntry(Proto.ANY),)
    out = [ServiceEntry(p) for p in whole]
    for p, spans in by_proto.items():
        if p in whole:
            continue
        spans.sort()
        merged: list[list[int]] = []
        for lo, hi in spans:
            if merged and (lo <= merged[-1][1] + 1 and not p.is_icmp):
                merged[-1][1] = max(merged[-1][1], hi)
            elif merged and lo <= merged[-1][1]:
                continue
            else:
                merged.append([lo, hi])
        out += [ServiceEntry(p, lo, hi) for lo, hi in merged]
    return tuple(sorted(out))


def _entry_slug(e: ServiceEntry) -> str:
    if e.proto is Proto.ANY:
        return "any"
    if e.first is None:
        return str(e.proto.value)
    span = str(e.first) if e.last in (None, e.first) else f"{e.first}-{e.last}"
    return f"{e.proto.value}-{span}" if e.proto.is_icmp else f"{span}-{e.proto.value}"


def _digest(text: str, n: int = 10) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-.") or "group"


def _fresh(base: str, taken: set[str]) -> str:
    name, n = base[:63], 2
    while name in taken:
        suffix = f"-{n}"
        name = base[: 63 - len(suffix)] + suffix
        n += 1
    taken.add(name)
    return name


# ---- suggesting ------------------------------------------------------------------------------


def suggest(
    policy: Policy,
    connections: Iterable[Connection],
    group: Sequence[Label],
    *,
    keys: Sequence[str] = DEFAULT_GROUP_KEYS,
    role_key: str = DEFAULT_ROLE_KEY,
    include_allowed: bool = False,
) -> Suggestions:
    """Suggested rules for the app group whose ``keys`` labels are ``group`` (missing key: no label).

    ``policy`` is the draft the rules would be accepted into (for reusable services and IP
    lists, free names and what is already allowed).
    """
    keys = tuple(keys)
    extra = [lab for lab in group if lab.key not in keys]
    if extra:
        raise ValidationError([Issue("api", 0, "group", f"label {extra[0]} is not a grouping key ({', '.join(keys)})")])
    gv = group_values(group, keys)
    gid = group_id(gv, keys)
    vocab = _Vocabulary(policy, (*keys, role_key))
    scope = vocab.class_selector(frozenset(group), keys)
    if not scope.require and not scope.exclude:
        raise ValidationError([Issue("api", 0, "group", "the group has no labels to scope a ruleset with")])
    if not any(group_values(w.labels, keys) == gv for w in policy.workloads):
        raise NotFoundError(f"no workload is in app group {gid}")

    res = Resolver(policy)
    full = Evaluator(replace(policy, workloads=tuple(replace(w, mode=EnforcementMode.FULL) for w in policy.workloads)))
    managed = set(res.owner)
    reusable: dict[str, bool] = {
        ipl.name: not any(ipl.ranges().contains(a) for a in managed) for ipl in policy.ip_lists
    }

    def in_group(w: Workload | None) -> bool:
        return w is not None and group_values(w.labels, keys) == gv

    def role_of(w: Workload) -> Selector:
        sel = vocab.class_selector(w.labels, (role_key,))
        return sel if sel.require or sel.exclude else ALL_WORKLOADS

    def unmanaged(a: IPAddress) -> _Item:
        for name in res.ip_lists_containing(a):
            if reusable[name]:
                return IPListSelector(name)
        return _addr(a)

    def outside(w: Workload) -> tuple[_Item, ConsumerScope]:
        sel = vocab.class_selector(w.labels, (*keys, role_key))
        if sel.require or sel.exclude:
            return sel, ConsumerScope.GLOBAL
        # a workload with no usable labels at all: name its addresses
        return _addr(w.addresses[0]), ConsumerScope.INTRA

    pairs: dict[tuple[_Item, _Item, ConsumerScope], set[ServiceEntry]] = {}
    tally: dict[tuple[_Item, _Item, ConsumerScope], tuple[int, int]] = {}
    considered = allowed = 0
    elsewhere: dict[str, int] = {}
    for c in connections:
        k = c.key
        src_w, dst_w = res.owner.get(k.src), res.owner.get(k.dst)
        consumer: _Item
        provider: _Item
        if in_group(dst_w):
            assert dst_w is not None
            provider = role_of(dst_w)
            if in_group(src_w):
                assert src_w is not None
                consumer, scope_kind = role_of(src_w), ConsumerScope.INTRA
            elif src_w is not None:
                consumer, scope_kind = outside(src_w)
            else:
                consumer, scope_kind = unmanaged(k.src), ConsumerScope.INTRA
        elif in_group(src_w):
            assert src_w is not None
            if dst_w is not None:
                gid_dst = group_id(group_values(dst_w.labels, keys), keys)
                elsewhere[gid_dst] = elsewhere.get(gid_dst, 0) + 1
                continue
            consumer, scope_kind, provider = role_of(src_w), ConsumerScope.INTRA, unmanaged(k.dst)
        else:
            continue
        considered += 1
        if not include_allowed and full.evaluate(k.src, k.dst, k.proto, k.port).verdict is Verdict.ALLOWED:
            allowed += 1
            continue
        entry = _entry(c)
        pairs.setdefault((consumer, provider, scope_kind), set()).add(entry)
        t = tally.get((consumer, provider, scope_kind), (0, 0))
        tally[(consumer, provider, scope_kind)] = (t[0] + 1, t[1] + c.count)

    rules, services, ip_lists = _build_rules(policy, gv, pairs, tally)
    taken = {rs.name for rs in policy.rulesets}
    ruleset = _fresh(f"{PREFIX}-{_slug('-'.join(v for v in gv if v))}", taken)
    return Suggestions(gid, scope, ruleset, rules, services, ip_lists, considered, allowed,
                       tuple(Elsewhere(g, n) for g, n in sorted(elsewhere.items())))


def _build_rules(
    policy: Policy,
    gv: tuple[str, ...],
    pairs: dict[tuple[_Item, _Item, ConsumerScope], set[ServiceEntry]],
    tally: dict[tuple[_Item, _Item, ConsumerScope], tuple[int, int]],
) -> tuple[tuple[SuggestedRule, ...], tuple[Service, ...], tuple[IPList, ...]]:
    # 1. join consumers of one (provider, ports, scope); 2. join providers of one (consumers, ports, scope)
    by_provider: dict[tuple[_Item, tuple[ServiceEntry, ...], ConsumerScope], set[_Item]] = {}
    for (cons, prov, sk), seen in pairs.items():
        by_provider.setdefault((prov, _normal(seen), sk), set()).add(cons)
    by_consumers: dict[tuple[tuple[_Item, ...], tuple[ServiceEntry, ...], ConsumerScope], set[_Item]] = {}
    for (prov, ports, sk), conss in by_provider.items():
        by_consumers.setdefault((tuple(sorted(conss, key=_item_key)), ports, sk), set()).add(prov)

    service_names = {s.name for s in policy.services}
    existing = {_normal(s.entries): s.name for s in sorted(policy.services, key=lambda s: s.name)}
    list_names = {i.name for i in policy.ip_lists}
    new_services: dict[tuple[ServiceEntry, ...], Service] = {}
    new_lists: dict[tuple[_Addr, ...], IPList] = {}
    slug = _slug("-".join(v for v in gv if v))

    def service_for(entries: tuple[ServiceEntry, ...]) -> str:
        if entries in existing:
            return existing[entries]
        if entries not in new_services:
            text = "_".join(_entry_slug(e) for e in entries)
            base = f"{PREFIX}-{text}" if len(text) <= 50 else f"{PREFIX}-ports-{_digest(text)}"
            new_services[entries] = Service(_fresh(base, service_names), entries, "suggested from observed flows")
        return new_services[entries].name

    def selectors(items: Iterable[_Item]) -> tuple[Selector, ...]:
        out: list[Selector] = []
        addrs: list[_Addr] = []
        for it in items:
            if isinstance(it, _Addr):
                addrs.append(it)
            else:
                out.append(it)
        if addrs:
            bundle = tuple(sorted(addrs))
            if bundle not in new_lists:
                nets = tuple(ipaddress.ip_network(a.text) for a in bundle)
                name = _fresh(f"{PREFIX}-{slug}-peers-{_digest(','.join(a.text for a in bundle), 8)}", list_names)
                new_lists[bundle] = IPList(name, nets, (), "unmanaged peers seen in observed flows")
            out.append(IPListSelector(new_lists[bundle].name))
        return tuple(out)

    rules: list[SuggestedRule] = []
    for (cons_items, entries, sk), provs in sorted(by_consumers.items(), key=lambda kv: _rule_sort(kv[0], kv[1])):
        prov_items = tuple(sorted(provs, key=_item_key))
        n = cnt = 0
        for cons in cons_items:
            for prov in prov_items:
                k, m = tally.get((cons, prov, sk), (0, 0))
                n += k
                cnt += m
        consumers = selectors(cons_items)
        providers = selectors(prov_items)
        name = service_for(entries)
        text = "|".join([",".join(s.canonical() for s in consumers), ",".join(s.canonical() for s in providers),
                         ",".join(str(e) for e in entries), sk.value])
        rules.append(SuggestedRule(_digest(text, 12), consumers, providers, name, entries, sk, n, cnt))
    return tuple(rules), tuple(new_services.values()), tuple(new_lists.values())


def _rule_sort(
    key: tuple[tuple[_Item, ...], tuple[ServiceEntry, ...], ConsumerScope], provs: set[_Item]
) -> tuple[str, tuple[tuple[int, str], ...], tuple[tuple[int, int, int], ...], tuple[tuple[int, str], ...]]:
    conss, entries, sk = key
    return (sk.value, tuple(_item_key(c) for c in conss), tuple(e.sort_key() for e in entries),
            tuple(sorted(_item_key(p) for p in provs)))


# ---- accepting -------------------------------------------------------------------------------


def accept(s: Suggestions, rule_ids: Iterable[str] | None = None) -> Accepted:
    """The ruleset (and new services / IP lists it needs) for the chosen rules (None: all)."""
    wanted = None if rule_ids is None else set(rule_ids)
    chosen = [r for r in s.rules if wanted is None or r.id in wanted]
    if wanted is not None:
        missing = wanted - {r.id for r in chosen}
        if missing:
            raise NotFoundError(f"no suggested rule {sorted(missing)[0]!r} (the flows may have changed)")
    used_services = {r.service for r in chosen}
    used_lists = {
        sel.ip_list for r in chosen for sel in (*r.consumers, *r.providers) if isinstance(sel, IPListSelector)
    }
    ruleset = Ruleset(s.ruleset, (s.scope,), tuple(r.to_rule() for r in chosen),
                      f"suggested from observed flows of {s.group}")
    return Accepted(
        ruleset,
        tuple(x for x in s.services if x.name in used_services),
        tuple(x for x in s.ip_lists if x.name in used_lists),
    )


def with_accepted(policy: Policy, accepted: Accepted) -> Policy:
    """``policy`` plus the accepted objects (what the draft becomes)."""
    return replace(
        policy,
        services=tuple(sorted((*policy.services, *accepted.services), key=lambda s: s.name)),
        ip_lists=tuple(sorted((*policy.ip_lists, *accepted.ip_lists), key=lambda i: i.name)),
        rulesets=(*policy.rulesets, accepted.ruleset),
    )

