"""The compiler: policy + inventory -> per-host HostPolicy IR, incrementally."""

from stockade.compiler.compile import Compiler, collections_paused, compile_policy, set_name
from stockade.compiler.delta import diff_sets
from stockade.compiler.ir import (
    AddressSet,
    Direction,
    HostDelta,
    HostPolicy,
    HostRule,
    SetDelta,
    host_policy_from_dict,
    host_policy_from_json,
    host_policy_to_dict,
    host_policy_to_json,
)
from stockade.compiler.single import compile_host

__all__ = [
    "AddressSet",
    "Compiler",
    "Direction",
    "HostDelta",
    "HostPolicy",
    "HostRule",
    "SetDelta",
    "collections_paused",
    "compile_host",
    "compile_policy",
    "diff_sets",
    "host_policy_from_dict",
    "host_policy_from_json",
    "host_policy_to_dict",
    "host_policy_to_json",
    "set_name",
]
