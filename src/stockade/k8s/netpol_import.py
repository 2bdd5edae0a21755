"""NetworkPolicy YAML -> Stockade policy-as-code documents (the optional "move to label policy" view).

For users who want to turn per-namespace NetworkPolicies into Stockade's label rulesets. It reuses
the live translation's parser (:func:`stockade.k8s.netpol.parse_policy`: one reading of a
NetworkPolicy, the same problems) and maps what it parsed onto Stockade labels through the sync's
:class:`~stockade.k8s.mapping.LabelMapping`, plus one Stockade key (``namespace_key``, default
``ns``) holding the namespace name (the sync must map ``kubernetes.io/metadata.name`` onto it
for the imported rules to select the same pods).

What becomes what, per NetworkPolicy ``<ns>/<name>``:

* one Ruleset ``np.<ns>.<name>`` (scope ``all``; every selector names its namespace explicitly):
  ingress rule i -> consumers = its peers, providers = the selected pods; egress rule i ->
  consumers = the selected pods, providers = its peers;
* a peer's ``podSelector`` / ``namespaceSelector`` ``matchLabels`` (and ``In`` with one value,
  ``NotIn`` as excluded labels) on mapped keys -> a label selector; ``ipBlock`` -> an IPList
  (``except`` subtracted); ports -> one Service per rule (``any`` when the rule has no ports).

Never wider: anything that has no exact label equivalent (a label key the mapping does not carry,
``Exists``/``DoesNotExist``, ``In`` with several values, a named port, which needs the pods, a
parse problem) skips the **whole policy** with the reason in the report: dropping one peer or
port would change what the rest means. NetworkPolicy's isolation has no document of its own:
it is Stockade's ``full`` enforcement mode on the pods (said in the report's notes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from stockade.k8s.mapping import LabelMapping
from stockade.k8s.netpol import PeerSpec, PolicySpec, Selector, parse_policy
from stockade.model.addresses import Family, IPList
from stockade.model.labels import DEFAULT_LABEL_KEYS, Label, LabelKey, is_valid_name
from stockade.model.netpol import NetpolDirection
from stockade.model.policy import Policy
from stockade.model.rules import AllowRule, Ruleset
from stockade.model.selectors import ALL_WORKLOADS, IPListSelector, LabelSelector
from stockade.model.selectors import Selector as StockadeSelector
from stockade.model.services import Service
from stockade.policyfile.dump import policy_documents

NOTE_ISOLATION = (
    "NetworkPolicy isolation is Stockade's full enforcement mode: set the selected pods' workloads "
    "to mode full (pods no NetworkPolicy selected were unaffected in Kubernetes; in full mode they "
    "are default-deny too, narrower, never wider)"
)


class _Skip(Exception):
    pass


@dataclass(frozen=True)
class ImportReport:
    converted: tuple[str, ...]  # "<ns>/<name>" of every policy turned into documents
    skipped: tuple[tuple[str, str], ...]  # ("<ns>/<name>", why) of every policy left out
    notes: tuple[str, ...]


def _name(*parts: str) -> str:
    name = ".".join(parts)
    if len(name) <= 63 and is_valid_name(name):
        return name
    return f"{name[:50]}_{hashlib.sha256(name.encode()).hexdigest()[:12]}"


class _Importer:
    def __init__(self, mapping: LabelMapping, namespace_key: str) -> None:
        self.pod_keys = dict(mapping.pod)
        self.ns_keys = {"kubernetes.io/metadata.name": namespace_key, **dict(mapping.namespace)}
        self.namespace_key = namespace_key
        self.services: dict[str, Service] = {}
        self.ip_lists: dict[str, IPList] = {}
        self.keys: set[str] = {namespace_key, *self.pod_keys.values(), *self.ns_keys.values()}

    def labels(self, sel: Selector, table: Mapping[str, str], where: str) -> tuple[list[Label], list[Label]]:
        require: list[Label] = []
        exclude: list[Label] = []
        for r in sel.requirements:
            target = table.get(r.key)
            if target is None:
                raise _Skip(f"{where}: label {r.key!r} is not mapped onto a Stockade key")
            bad = [v for v in sorted(r.values) if not is_valid_name(v)]
            if bad:
                raise _Skip(f"{where}: value {bad[0]!r} is not a valid Stockade label value")
            if r.operator == "In" and len(r.values) == 1:
                require.append(Label(target, next(iter(r.values))))
            elif r.operator == "NotIn":
                exclude += [Label(target, v) for v in sorted(r.values)]
            else:
                raise _Skip(f"{where}: {r.key} {r.operator} {sorted(r.values)} has no exact label equivalent")
        return require, exclude

    def pods(self, ns: str | None, pods: Selector | None, where: str) -> StockadeSelector:
        require, exclude = self.labels(pods or Selector(), self.pod_keys, where)
        if ns is not None:
            require.append(Label(self.namespace_key, ns))
        if not require and not exclude:
            return ALL_WORKLOADS
        keys = [lab.key for lab in require]
        if len(keys) != len(set(keys)):
            raise _Skip(f"{where}: two values for one Stockade key")
        return LabelSelector(tuple(sorted(require)), (), tuple(sorted(set(exclude))))

    def peer(self, spec: PolicySpec, p: PeerSpec, where: str) -> StockadeSelector:
        if p.block is not None:
            name = _name("np", spec.namespace, spec.name, where.replace("[", "").replace("]", ""))
            nets = p.block.networks(Family.V4) + p.block.networks(Family.V6)
            self.ip_lists[name] = IPList(name, nets, (), f"ipBlock of NetworkPolicy {spec.namespace}/{spec.name}")
            return IPListSelector(name)
        if p.namespaces is None:
            return self.pods(spec.namespace, p.pods, where)
        ns_req, ns_exc = self.labels(p.namespaces, self.ns_keys, f"{where}.namespaceSelector")
        pod_sel = self.pods(None, p.pods, f"{where}.podSelector")
        if isinstance(pod_sel, LabelSelector):
            require, exclude = list(pod_sel.require), list(pod_sel.exclude)
        else:
            require, exclude = [], []
        require += ns_req
        exclude += ns_exc
        if not require and not exclude:
            return ALL_WORKLOADS
        if len({lab.key for lab in require}) != len(require):
            raise _Skip(f"{where}: pod and namespace selectors set one Stockade key twice")
        return LabelSelector(tuple(sorted(set(require))), (), tuple(sorted(set(exclude))))

    def policy(self, spec: PolicySpec) -> Ruleset | None:
        if spec.problems:
            raise _Skip("; ".join(spec.problems))
        if spec.selector is None:
            raise _Skip("spec.podSelector is unreadable")
        selected = self.pods(spec.namespace, spec.selector, "spec.podSelector")
        rules: list[AllowRule] = []
        for r in spec.rules:
            if not spec.ingress and r.direction is NetpolDirection.INGRESS:
                continue
            if not spec.egress and r.direction is NetpolDirection.EGRESS:
                continue
            where = f"{r.direction.value}[{r.index}]"
            peers = tuple(self.peer(spec, p, f"{where}.peer{j}") for j, p in enumerate(r.peers)) or (ALL_WORKLOADS,)
            if r.ports is None:
                services: tuple[str, ...] = ("any",)
            else:
                if any(p.name is not None for p in r.ports):
                    raise _Skip(f"{where}: a named port resolves per pod; use the live NetworkPolicy support")
                svc = Service(_name("np", spec.namespace, spec.name, where.replace("[", "").replace("]", "")),
                              tuple(sorted({p.entry() for p in r.ports})),
                              f"ports of NetworkPolicy {spec.namespace}/{spec.name} {where}")
                self.services[svc.name] = svc
                services = (svc.name,)
            text = f"{spec.namespace}/{spec.name} {where}"
            if r.direction is NetpolDirection.INGRESS:
                rules.append(AllowRule(peers, (selected,), services, description=text))
            else:
                rules.append(AllowRule((selected,), peers, services, description=text))
        if not rules:
            return None
        return Ruleset(_name("np", spec.namespace, spec.name), (), tuple(rules),
                       f"from NetworkPolicy {spec.namespace}/{spec.name}")


def _objects(texts: Iterable[str]) -> Iterable[Mapping[str, Any]]:
    for text in texts:
        for doc in yaml.safe_load_all(text):
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "List" or (isinstance(doc.get("kind"), str) and doc["kind"].endswith("List")):
                yield from (i for i in doc.get("items") or [] if isinstance(i, dict))
            else:
                yield doc


def to_policy_documents(
    texts: Iterable[str],
    *,
    mapping: LabelMapping | None = None,
    namespace_key: str = "ns",
    default_namespace: str = "default",
) -> tuple[list[dict[str, Any]], ImportReport]:
    """Stockade policy documents (as ``stockade.policyfile.dump.policy_documents`` writes them) for
    the NetworkPolicies in ``texts`` (YAML, several documents or ``kind: List`` each), and a report."""
    if not is_valid_name(namespace_key):
        raise ValueError(f"namespace_key {namespace_key!r} is not a valid Stockade key")
    imp = _Importer(mapping or LabelMapping(), namespace_key)
    rulesets: list[Ruleset] = []
    converted: list[str] = []
    skipped: list[tuple[str, str]] = []
    for obj in _objects(texts):
        if obj.get("kind") != "NetworkPolicy" or obj.get("apiVersion") != "networking.k8s.io/v1":
            continue
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        ns = (meta or {}).get("namespace") or default_namespace
        fixed = {**obj, "metadata": {**(meta or {}), "namespace": ns}}
        spec = parse_policy(fixed)
        ref = f"{spec.namespace}/{spec.name}"
        services, ip_lists = dict(imp.services), dict(imp.ip_lists)
        try:
            rs = imp.policy(spec)
        except _Skip as exc:
            imp.services, imp.ip_lists = services, ip_lists  # nothing of a skipped policy stays
            skipped.append((ref, str(exc)))
            continue
        converted.append(ref)
        if rs is not None:
            rulesets.append(rs)
    keys = tuple(LabelKey(k) for k in sorted(set(DEFAULT_LABEL_KEYS) | imp.keys))
    policy = Policy(label_keys=keys, services=tuple(sorted(imp.services.values())),
                    ip_lists=tuple(sorted(imp.ip_lists.values())), rulesets=tuple(sorted(rulesets)))
    notes = [NOTE_ISOLATION]
    if any(r for r in rulesets):
        notes.append(f"pods need the Stockade label {namespace_key}=<namespace>: map the namespace label "
                     f"kubernetes.io/metadata.name onto {namespace_key!r} in the sync")
    return policy_documents(policy), ImportReport(tuple(converted), tuple(skipped), tuple(notes))
