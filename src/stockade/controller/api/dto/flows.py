"""Response and request bodies of the flow routes (:mod:`~stockade.controller.api.flows`, ``flows_policy``)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, Field

from stockade.compiler.ir import Direction
from stockade.evaluator import Verdict
from stockade.model.services import Proto


class UploadOut(BaseModel):
    accepted: int


class EndpointOut(BaseModel):
    ip: str
    workload: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    ip_list: str | None = Field(None, description="unmanaged: the most specific IP list holding the address")


class FlowOut(BaseModel):
    id: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    src: EndpointOut
    dst: EndpointOut
    proto: Proto
    port: int | None
    service: str
    side: Direction = Field(description="out: reported by the source host; in: by the destination host")
    reporter: str
    verdict: Verdict
    rule_id: str
    count: int


class FlowPage(BaseModel):
    items: list[FlowOut]
    next_cursor: str | None = None


class FlowKeyOut(BaseModel):
    src: EndpointOut
    dst: EndpointOut
    proto: Proto
    port: int | None
    service: str


class DecisionOut(BaseModel):
    workload: str
    action: str
    rule_id: str
    encrypted: bool = Field(False, description="the deciding rule says encrypt (WireGuard)")


class ExplainOut(BaseModel):
    flow: FlowKeyOut
    verdict: Verdict = Field(description="the active policy's verdict now (reference evaluator)")
    reported: Verdict | None = Field(None, description="the worst verdict the hosts reported")
    outbound: DecisionOut | None = None
    inbound: DecisionOut | None = None
    reported_outbound_rule: str | None = None
    reported_inbound_rule: str | None = None
    count: int = 0
    encrypted: bool = Field(False, description="allowed through WireGuard between the two workloads")
    encrypted_by: str | None = Field(None, description="the rule that says encrypt")


class AgentFlowStats(BaseModel):
    agent_id: str
    workload: str
    records: int
    batches: int
    dropped: int = Field(description="summaries the agent reports it had to drop (bounded buffer)")
    last_upload: dt.datetime


class NodeOut(BaseModel):
    id: str
    kind: str
    name: str
    labels: dict[str, str]
    workloads: list[str]


class EdgeOut(BaseModel):
    src: str
    dst: str
    connections: int
    count: int
    allowed: int
    potentially_blocked: int
    blocked: int
    services: list[str]
    encrypted: int = Field(0, description="connections the active policy sends through WireGuard (encrypt: true)")


class MapOut(BaseModel):
    group_keys: list[str]
    since: dt.datetime
    until: dt.datetime | None
    nodes: list[NodeOut]
    edges: list[EdgeOut]


class SuggestedRuleOut(BaseModel):
    id: str
    consumers: list[dict[str, Any]]
    providers: list[dict[str, Any]]
    consumers_scope: str
    service: str
    ports: list[str]
    connections: int
    count: int


class SuggestionsOut(BaseModel):
    group: str
    ruleset: str
    scope: dict[str, Any]
    rules: list[SuggestedRuleOut]
    new_services: list[dict[str, Any]]
    new_ip_lists: list[dict[str, Any]]
    considered: int
    already_allowed: int
    elsewhere: dict[str, int] = Field(description="connections to other groups: their suggestions cover them")


class AcceptIn(BaseModel):
    group: Annotated[str, Field(max_length=512)]
    keys: Annotated[str, Field(max_length=200)] = "app,env"
    role_key: Annotated[str, Field(max_length=63)] = "role"
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    include_allowed: bool = False
    rules: list[Annotated[str, Field(max_length=32)]] | None = Field(None, max_length=1000,
                                                                     description="rule ids; null: all")


class AcceptOut(BaseModel):
    ruleset: str
    services: list[str]
    ip_lists: list[str]
    rules: int


class ImpactItemOut(BaseModel):
    change: str
    src: str
    dst: str
    proto: Proto
    port: int | None
    service: str
    count: int
    reported: Verdict
    before: Verdict
    after: Verdict
    before_rules: list[str]
    after_rules: list[str]
    sentence: str = Field(description='in words: "web-1 -> db-1 5432/tcp becomes allowed by ruleset shop rule 1"')


class WideningOut(BaseModel):
    ruleset: str
    rule: int = Field(description="the rule's position, counted from 1")
    rule_id: str
    added: list[str] = Field(description="workloads the rule reaches that it did not")
    reaches: int
    new_rule: bool
    every_workload: bool
    needs_confirmation: bool
    sentence: str


class ImpactOut(BaseModel):
    since: dt.datetime
    until: dt.datetime | None
    evaluated: int
    newly_blocked: int
    newly_potentially_blocked: int
    newly_allowed: int
    no_longer_blocked: int
    items: list[ImpactItemOut]
    widened: list[WideningOut] = Field(default_factory=list, description="allow rules reaching more workloads")
    confirm: list[str] = Field(default_factory=list,
                               description="what provisioning needs a confirmation for, in words (empty: nothing)")
