"""The domain model: pure, frozen, no I/O."""

from stockade.model.addresses import AddressRanges, Family, IPAddress, IPList, IPNetwork, family_of
from stockade.model.labels import DEFAULT_LABEL_KEYS, Label, LabelGroup, LabelKey, is_valid_name
from stockade.model.policy import DEFAULT_MANAGEMENT, Failsafe, Policy
from stockade.model.rules import Action, AllowRule, ConsumerScope, DenyRule, Ruleset
from stockade.model.selectors import (
    ALL_WORKLOADS,
    AllWorkloads,
    IPListSelector,
    LabelSelector,
    Selector,
    confine,
)
from stockade.model.services import ANY_SERVICE_ENTRY, Proto, Service, ServiceEntry
from stockade.model.workloads import EnforcementMode, Interface, Workload

__all__ = [
    "ALL_WORKLOADS",
    "ANY_SERVICE_ENTRY",
    "DEFAULT_LABEL_KEYS",
    "DEFAULT_MANAGEMENT",
    "Action",
    "AddressRanges",
    "AllWorkloads",
    "AllowRule",
    "ConsumerScope",
    "DenyRule",
    "EnforcementMode",
    "Failsafe",
    "Family",
    "IPAddress",
    "IPList",
    "IPListSelector",
    "IPNetwork",
    "Interface",
    "Label",
    "LabelGroup",
    "LabelKey",
    "LabelSelector",
    "Policy",
    "Proto",
    "Ruleset",
    "Selector",
    "Service",
    "ServiceEntry",
    "Workload",
    "confine",
    "family_of",
    "is_valid_name",
]
