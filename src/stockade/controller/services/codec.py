"""The registry of stored kinds, between REST bodies and the frozen domain model.

Each :class:`Kind` names a stored object kind, its URL path, its Pydantic body (the
OpenAPI schema and the wire gate), whether it is part of the provisioned policy
(``POLICY``: edited in the draft, frozen in versions) or of the live inventory
(``INVENTORY``: label keys and workloads take effect at once, as in Illumio) or of enrolment
(``ENROLMENT``: pairing profiles, live but outside the policy), and the two
conversions. Both are the one document codec shared with the YAML loader
(:mod:`stockade.codec.bodies`): ``decode`` performs every check about one object and raises
:class:`~stockade.errors.ValidationError` with one :class:`~stockade.errors.Issue` per bad
field; ``encode`` writes the canonical stored body (sorted labels, compressed IPv6 text,
explicit defaults), which makes diffs and ETags stable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pydantic import BaseModel

from stockade.codec import bodies
from stockade.codec.bodies import BUILTIN_ANY
from stockade.controller.api import schemas as s
from stockade.model.labels import DEFAULT_LABEL_KEYS, LabelKey
from stockade.model.policy import Failsafe, Policy
from stockade.model.services import Service

SOURCE = bodies.SOURCE

# Encoders under their historical names (the suggestion routes build bodies with them).
ruleset_to = bodies.ruleset_body
service_to = bodies.service_body
ip_list_to = bodies.ip_list_body


class Scope(Enum):
    POLICY = "policy"  # draft + provisioned versions
    INVENTORY = "inventory"  # live
    # live, outside the policy document and the compiled policy: its effect comes later (a pairing
    # profile's labels reach a workload only when an agent enrols), so a label scope cannot judge
    # it by compiled effect and a label-scoped principal may not write it
    ENROLMENT = "enrolment"


# ---- registry -------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One stored object kind and how its bodies map to the domain model."""

    name: str  # stored kind, e.g. "ruleset"
    path: str  # URL collection, e.g. "rulesets"
    title: str  # for OpenAPI tags
    scope: Scope
    body: type[BaseModel]  # the wire shape (OpenAPI); the codec decides what is valid

    def decode(self, data: Any) -> Any:
        """The domain object of a raw JSON body (every issue at once, as a ValidationError)."""
        return bodies.decode(self.name, data)

    def encode(self, obj: Any) -> dict[str, Any]:
        """The canonical stored body of a domain object."""
        return bodies.encode(self.name, obj)

    def canonical(self, data: Any) -> dict[str, Any]:
        return self.encode(self.decode(data))

    @property
    def scope_checked(self) -> bool:
        """Whether a label-scoped principal's write is judged by its compiled effect
        (:mod:`stockade.controller.services.scope`); writes of other kinds refuse it."""
        return self.scope is not Scope.ENROLMENT


KINDS: tuple[Kind, ...] = (
    Kind("label_key", "label-keys", "Label keys", Scope.INVENTORY, s.LabelKeyBody),
    Kind("workload", "workloads", "Workloads", Scope.INVENTORY, s.WorkloadBody),
    Kind("label_group", "label-groups", "Label groups", Scope.POLICY, s.LabelGroupBody),
    Kind("ip_list", "ip-lists", "IP lists", Scope.POLICY, s.IPListBody),
    Kind("service", "services", "Services", Scope.POLICY, s.ServiceBody),
    Kind("ruleset", "rulesets", "Rulesets", Scope.POLICY, s.RulesetBody),
    Kind("deny_rule", "deny-rules", "Deny rules", Scope.POLICY, s.DenyRuleBody),
    Kind("failsafe", "failsafe", "Failsafe", Scope.POLICY, s.FailsafeBody),
    Kind("network_policy", "network-policies", "Kubernetes NetworkPolicies", Scope.INVENTORY, s.NetworkPolicyBody),
    Kind("pairing_profile", "pairing-profiles", "Pairing profiles", Scope.ENROLMENT, s.PairingProfileBody),
)
KIND_BY_NAME: dict[str, Kind] = {k.name: k for k in KINDS}
POLICY_KINDS = tuple(k.name for k in KINDS if k.scope is Scope.POLICY)
INVENTORY_KINDS = tuple(k.name for k in KINDS if k.scope is Scope.INVENTORY)

Objects = dict[str, dict[str, dict[str, Any]]]  # kind -> name -> canonical body


def domain_objects(kind: str, stored: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    k = KIND_BY_NAME[kind]
    return [k.decode(_stored(kind, stored[n])) for n in sorted(stored)]


def _stored(kind: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stored body as the codec reads it today: rulesets stored before the explicit "all"
    form kept an unscoped ruleset as ``scope: []``, which meant every workload."""
    if kind == "ruleset" and body.get("scope") == []:
        return {**body, "scope": "all"}
    return body


def build_policy(objects: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Policy:
    """A :class:`Policy` from stored bodies (policy and inventory kinds together)."""

    def get(kind: str) -> list[Any]:
        return domain_objects(kind, objects.get(kind, {}))

    keys = get("label_key") if "label_key" in objects else [LabelKey(k) for k in DEFAULT_LABEL_KEYS]
    failsafe = get("failsafe")
    return Policy(
        label_keys=tuple(keys),
        label_groups=tuple(get("label_group")),
        workloads=tuple(get("workload")),
        ip_lists=tuple(get("ip_list")),
        services=_with_builtin_any(get("service")),
        rulesets=tuple(get("ruleset")),
        deny_rules=tuple(get("deny_rule")),
        failsafe=failsafe[0] if failsafe else Failsafe(),
        network_policies=tuple(get("network_policy")),
    )


def _with_builtin_any(services: list[Service]) -> tuple[Service, ...]:
    """The service ``any`` is built in, as in the policy files."""
    if any(x.name == BUILTIN_ANY.name for x in services):
        return tuple(services)
    return tuple(sorted((*services, BUILTIN_ANY), key=lambda x: x.name))


def objects_of_policy(policy: Policy) -> Objects:
    """Stored bodies of every object of ``policy`` (the inverse of :func:`build_policy`)."""
    out: Objects = {
        "label_key": {k.name: bodies.label_key_body(k) for k in policy.label_keys},
        "workload": {w.name: bodies.workload_body(w) for w in policy.workloads},
        "label_group": {g.name: bodies.label_group_body(g) for g in policy.label_groups},
        "ip_list": {x.name: bodies.ip_list_body(x) for x in policy.ip_lists},
        "service": {x.name: bodies.service_body(x) for x in policy.services if x != BUILTIN_ANY},
        "ruleset": {x.name: bodies.ruleset_body(x) for x in policy.rulesets},
        "deny_rule": {x.name: bodies.deny_rule_body(x) for x in policy.deny_rules},
    }
    if policy.failsafe != Failsafe():
        out["failsafe"] = {bodies.FAILSAFE_NAME: bodies.failsafe_body(policy.failsafe)}
    return out
