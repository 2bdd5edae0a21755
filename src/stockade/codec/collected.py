"""What the document codec collects: the kinds of document and the accumulator of a load.

``stockade.codec.documents`` parses; this module holds the data it appends to (the model
objects, and every name declared or referenced and every label used, each with its ``Where``),
which ``stockade.policyfile.crossref`` checks across all sources afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from stockade.codec.tree import Entry, Where
from stockade.errors import Issue
from stockade.model.addresses import IPAddress, IPList
from stockade.model.labels import LabelGroup, LabelKey
from stockade.model.policy import Failsafe
from stockade.model.rules import DenyRule, Ruleset
from stockade.model.services import ANY_SERVICE_ENTRY, Service
from stockade.model.workloads import Workload

API_VERSION = "stockade.io/v1"
BUILTIN_ANY = Service("any", (ANY_SERVICE_ENTRY,), "every protocol and port")  # always present
MAX_TEXT = 1024  # characters of a description


class Kind(Enum):
    """The kinds of policy document, in the order ``dump_policy`` writes them."""

    SETTINGS = "Settings"
    LABEL_KEY = "LabelKey"
    LABEL_GROUP = "LabelGroup"
    SERVICE = "Service"
    IP_LIST = "IPList"
    WORKLOAD = "Workload"
    RULESET = "Ruleset"
    DENY_RULE = "DenyRule"

    @property
    def noun(self) -> str:
        return _NOUNS[self]


_NOUNS = {
    Kind.SETTINGS: "Settings document",
    Kind.LABEL_KEY: "label key",
    Kind.LABEL_GROUP: "label group",
    Kind.SERVICE: "service",
    Kind.IP_LIST: "IP list",
    Kind.WORKLOAD: "workload",
    Kind.RULESET: "ruleset",
    Kind.DENY_RULE: "deny rule",
}


@dataclass(frozen=True)
class Declaration:
    kind: Kind
    name: str
    where: Where


@dataclass(frozen=True)
class Reference:
    kind: Kind  # SERVICE, IP_LIST or LABEL_GROUP
    name: str
    where: Where


@dataclass(frozen=True)
class LabelUse:
    key: str
    value: str
    key_where: Where
    value_where: Where


@dataclass(frozen=True)
class AddressClaim:
    address: IPAddress
    workload: str
    where: Where


@dataclass
class Collected:
    """Everything read from all sources so far (a mutable accumulator, private to the loader)."""

    issues: list[Issue] = field(default_factory=list)
    declarations: list[Declaration] = field(default_factory=list)
    references: list[Reference] = field(default_factory=list)
    label_uses: list[LabelUse] = field(default_factory=list)
    claims: list[AddressClaim] = field(default_factory=list)
    open_label_keys: set[str] = field(default_factory=set)  # declared, values unreadable: accept any
    unreadable_sources: int = 0  # sources whose YAML could not be read completely
    settings: list[Failsafe] = field(default_factory=list)
    label_keys: list[LabelKey] = field(default_factory=list)
    label_groups: list[LabelGroup] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    ip_lists: list[IPList] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)
    rulesets: list[Ruleset] = field(default_factory=list)
    deny_rules: list[DenyRule] = field(default_factory=list)


Entries = dict[str, Entry]
