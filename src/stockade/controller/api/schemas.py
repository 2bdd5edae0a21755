"""API types: the JSON bodies of the REST API, as Pydantic models (they make the OpenAPI schema).

They mirror the YAML policy documents of :mod:`stockade.policyfile` (same field names, same
``"80/tcp"`` port syntax, selectors as label maps), minus ``apiVersion``/``kind``.
They are wire shapes only. :mod:`stockade.controller.services.codec` turns them into the frozen domain
model (:mod:`stockade.model`) and back, adding the semantic checks Pydantic cannot express
(CIDR syntax, port ranges, one selector form at a time). Unknown fields are rejected.

Selectors are written as one of::

    {"labels": {"app": "shop", "env": "prod"}, "label_groups": ["web-tiers"], "exclude": {"role": "bastion"}}
    {"ip_list": "corp-nets"}
    {"all": true}
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict

from stockade.model.pairing import DEFAULT_CODE_TTL, MAX_CODE_TTL, MAX_USES, MIN_CODE_TTL
from stockade.model.rules import ConsumerScope
from stockade.model.workloads import EnforcementMode

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$"

Name = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=63)]
Text = Annotated[str, Field(max_length=1024)]
Address = Annotated[str, Field(min_length=2, max_length=64, description="IPv4/IPv6 address or CIDR")]
# an integer in a body is a JSON integer: ``true``/``false`` (and "3", 3.0) are refused, not coerced
StrictInt = Annotated[int, Strict()]

# List lengths every body is held to (a 422 names the field); the body limits of
# stockade.controller.limits are sized so that a list at its cap still fits.
MAX_VALUES = 1024  # allowed values of a label key, values of a label group
MAX_LABELS = 64  # labels of a workload or a selector
MAX_INTERFACES = 64  # interfaces of a workload
MAX_INTERFACE_ADDRESSES = 256  # addresses of one interface
MAX_IP_LIST_ENTRIES = 10_000  # include (and exclude) CIDRs of one IP list
MAX_PORTS = 1024  # port entries of a service, management ports of the failsafe
MAX_SELECTORS = 64  # selectors in a scope, consumers, providers; groups in a selector
MAX_RULE_SERVICES = 256  # services of one rule
MAX_RULES = 1000  # rules of one ruleset
MAX_CONTROLLERS = 64  # controller addresses of the failsafe


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelKeyBody(Body):
    name: Name
    values: list[Name] = Field(default_factory=list, max_length=MAX_VALUES,
                               description="allowed values; empty: any value")


class LabelGroupBody(Body):
    name: Name
    key: Name
    values: list[Name] = Field(min_length=1, max_length=MAX_VALUES)


class InterfaceBody(Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]*$")]
    addresses: list[Address] = Field(default_factory=list, max_length=MAX_INTERFACE_ADDRESSES)


class WorkloadBody(Body):
    name: Name
    labels: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_LABELS,
                                     description="one value per declared key")
    interfaces: list[InterfaceBody] = Field(default_factory=list, max_length=MAX_INTERFACES)
    mode: EnforcementMode = EnforcementMode.VISIBILITY
    backend: Name | None = Field(None, description="firewall backend the agent must enforce with "
                                 "(nftables, iptables, ebpf...); null: the agent's own --backend")
    description: Text = ""


class IPListBody(Body):
    name: Name
    include: list[Address] = Field(min_length=1, max_length=MAX_IP_LIST_ENTRIES)
    exclude: list[Address] = Field(default_factory=list, max_length=MAX_IP_LIST_ENTRIES)
    description: Text = ""


PortText = Annotated[
    str,
    Field(min_length=1, max_length=32, description='"80/tcp", "8000-8080/tcp", "udp", "icmp:8", "icmpv6", "any"'),
]


class ServiceBody(Body):
    name: Name
    ports: list[PortText] = Field(min_length=1, max_length=MAX_PORTS)
    description: Text = ""


class SelectorBody(Body):
    labels: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_LABELS, description="all required")
    label_groups: list[Name] = Field(default_factory=list, max_length=MAX_SELECTORS, description="each must match")
    exclude: dict[Name, Name | Annotated[list[Name], Field(max_length=MAX_VALUES)]] = Field(
        default_factory=dict, max_length=MAX_LABELS, description="none may match"
    )
    ip_list: Name | None = None
    all: bool = False


# The policy files' spellings of "every workload", accepted in bodies too (one codec for both).
AllText = Literal["all"]
SelectorItem = SelectorBody | AllText
RuleSide = Annotated[list[SelectorItem], Field(max_length=MAX_SELECTORS)] | AllText


class AllowRuleBody(Body):
    consumers: RuleSide = Field(min_length=1)
    providers: RuleSide = Field(min_length=1)
    services: list[Name] = Field(min_length=1, max_length=MAX_RULE_SERVICES)
    consumers_scope: ConsumerScope = ConsumerScope.INTRA
    description: Text = ""
    encrypt: bool = Field(False, description="traffic flows only through WireGuard between the two workloads")


class RulesetBody(Body):
    name: Name
    scope: Annotated[list[SelectorBody], Field(max_length=MAX_SELECTORS)] | Literal["all"] | None = Field(
        None, description='label selectors, or "all" to govern every workload (required; an empty list is refused)')
    rules: list[AllowRuleBody] = Field(default_factory=list, max_length=MAX_RULES)
    description: Text = ""
    encrypt: bool = Field(False, description="every rule of the ruleset is encrypted (WireGuard)")


class DenyRuleBody(Body):
    name: Name
    consumers: RuleSide = Field(min_length=1)
    providers: RuleSide = Field(min_length=1)
    services: list[Name] = Field(min_length=1, max_length=MAX_RULE_SERVICES)
    override: bool = False
    description: Text = ""


class FailsafeBody(Body):
    name: Name = "default"
    controller: list[Address] = Field(default_factory=list, max_length=MAX_CONTROLLERS)
    controller_port: Annotated[StrictInt, Field(ge=1, le=65535)] = 8443
    management: list[PortText] = Field(default_factory=lambda: ["22/tcp"], max_length=MAX_PORTS)


class NetworkPolicyRuleBody(Body):
    direction: Literal["ingress", "egress"]
    index: Annotated[StrictInt, Field(ge=0, le=9999)]
    targets: list[Name] = Field(max_length=100_000)
    any_peer: bool
    peer_workloads: list[Name] = Field(max_length=100_000)
    peer_cidrs: list[Address] = Field(max_length=100_000)
    ports: list[PortText] = Field(max_length=MAX_PORTS)


class NetworkPolicyBody(Body):
    """A Kubernetes NetworkPolicy as the cluster sync resolved it (``stockade.codec.netpol_body``)."""

    name: Name
    namespace: Annotated[str, Field(min_length=1, max_length=63)]
    policy: Annotated[str, Field(min_length=1, max_length=253)]
    selected: list[Name] = Field(max_length=100_000)
    isolates: list[Literal["ingress", "egress"]] = Field(max_length=2)
    rules: list[NetworkPolicyRuleBody] = Field(max_length=10_000)
    problems: list[Text] = Field(default_factory=list, max_length=100)


class PairingProfileBody(Body):
    """What an enrolled host becomes (preset labels and mode) and how far its codes reach
    (``stockade.codec.pairing_body``)."""

    name: Name
    labels: dict[Name, Name] = Field(default_factory=dict, max_length=MAX_LABELS,
                                     description="labels of every workload its codes create")
    mode: EnforcementMode = EnforcementMode.VISIBILITY
    expires_at: dt.datetime | None = None
    max_uses: Annotated[StrictInt, Field(ge=1, le=MAX_USES)] | None = None
    enabled: bool = True
    description: Text = ""
    code_max_uses: Annotated[StrictInt, Field(ge=1, le=MAX_USES, description="enrolments one code allows")] = 1
    code_ttl_seconds: Annotated[StrictInt, Field(ge=MIN_CODE_TTL, le=MAX_CODE_TTL,
                                                 description="lifetime of a new code")] = DEFAULT_CODE_TTL


# ---- responses and other requests -------------------------------------------


class ObjectOut(BaseModel):
    """One stored object: its kind, name, revision, ETag and body."""

    kind: str
    name: str
    revision: int
    etag: str
    updated_at: dt.datetime | None = None
    body: dict[str, Any]


class ObjectPage(BaseModel):
    items: list[ObjectOut]
    next_cursor: str | None = None


class PairingProfileOut(PairingProfileBody):
    """A pairing profile as its routes have always answered: the body's fields at the top, with
    the use counter (counted by enrolment, outside the ETag), the revision and the ETag."""

    uses: int
    revision: int
    etag: str


class FieldIssue(BaseModel):
    field: str
    message: str


class ErrorOut(BaseModel):
    error: str
    message: str
    issues: list[FieldIssue] = Field(default_factory=list)


class ProvisionIn(Body):
    message: Annotated[str, Field(min_length=1, max_length=1024)]


class RollbackIn(Body):
    version: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
    message: Annotated[str, Field(max_length=1024)] = ""


class ChangeOut(BaseModel):
    kind: str
    name: str
    change: str  # added / removed / modified
    fields: list[str] = Field(default_factory=list)
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None


class VersionOut(BaseModel):
    number: int
    created_at: dt.datetime
    author: str
    message: str
    rollback_of: int | None = None
    diff: list[ChangeOut]
    affected_workloads: list[str]
    impact: dict[str, Any] | None = None  # provision only: recorded flows whose verdict changes


class VersionPage(BaseModel):
    items: list[VersionOut]
    next_cursor: str | None = None


class DiffOut(BaseModel):
    base: str
    target: str
    changes: list[ChangeOut]


class EventOut(BaseModel):
    id: int
    time: dt.datetime
    actor: str
    action: str
    kind: str
    name: str
    before: Any = None
    after: Any = None


class EventPage(BaseModel):
    items: list[EventOut]
    next_cursor: str | None = None


class ImportResult(BaseModel):
    draft_changes: list[ChangeOut]
    inventory_changes: list[ChangeOut]
