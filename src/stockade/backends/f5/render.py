"""Pure rendering of a HostPolicy into F5 BIG-IP AFM objects (iControl REST JSON bodies).

A BIG-IP virtual server stands as a workload: clients connect *to* it, so only inbound rules
apply (the backend declares no outbound capability and fails closed on outbound rules). The
controller, not an agent, applies the policy over the management interface, so the controller
failsafe (an agent's outbound path) does not apply and is dropped before the capability check.

Objects, all in one partition and named after the virtual server (``stk_<vs>``):

* an **address list** per peer set, both families in one list (``addresses: [{"name": ...}]``);
  AFM address lists cannot be empty, so a rule whose peer has no member is left out;
* a **port list** per distinct TCP/UDP port set (``ports: [{"name": "80"}, {"name": "8000-8080"}]``);
* a **firewall policy** ``stk_<vs>`` whose ordered ``rules`` AFM evaluates first-match: the
  failsafe accepts (ICMPv6 neighbour discovery, management services), the host rules in
  precedence order (override-deny and deny -> ``drop`` with ``log: yes``, allow -> ``accept``;
  one rule per IP protocol, as ``ipProtocol`` takes one), then the mode default (full: drop
  everything; selective: accept everything);
* the **virtual server**'s ``fwEnforcedPolicy`` (full, selective) or ``fwStagedPolicy``
  (visibility: AFM evaluates and logs a staged policy without enforcing it; the staged policy
  is the full-mode one, so its drops are the would-be drops). ``"none"`` detaches, as in tmsh.

Field shapes checked against F5's public references: the tmsh ``security firewall policy``
reference (rule options ``action [accept | accept-decisively | drop | reject]``,
``ip-protocol``, ``source``/``destination`` ``address-lists``/``port-lists``,
``icmp { type | type:code }``, ``log [yes | no]``, ``status``) and its iControl REST form as
shown by F5's AFM REST lab (``ipProtocol``, ``log``, ``status``, ``destination.addressLists``
as full paths); the iControl REST ``APIRef_tm_security_firewall_*`` rule properties
(``action``, ``description``, ``ipProtocol``, ``log``); address lists
``{"name", "addresses": [{"name": "8.8.4.4"}]}`` and port lists
``{"ports": [{"name": "22"}]}`` as the REST API returns them; and ``fwEnforcedPolicy`` /
``fwStagedPolicy`` on ``/mgmt/tm/ltm/virtual``. ``tests/fakes/f5_icontrol.py`` enforces the
same shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from stockade.backends.common import ND_TYPES, PORT_MAX, service_groups
from stockade.compiler.ir import HostPolicy, HostRule
from stockade.errors import RenderError
from stockade.model.addresses import AddressRanges, Family, IPNetwork
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

BACKEND_NAME = "f5"
NONE = "none"
_PARTITION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
_OBJECT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_VIRTUAL_RE = re.compile(r"^/([A-Za-z][A-Za-z0-9_.\-]{0,63})/([A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})$")


def full_path(partition: str, name: str) -> str:
    return f"/{partition}/{name}"


def rest_id(path: str) -> str:
    """``/Common/x`` -> ``~Common~x``, the resource id in an iControl REST URI."""
    return path.replace("/", "~")


def validate_virtual(path: str) -> tuple[str, str]:
    m = _VIRTUAL_RE.match(path)
    if not m:
        raise RenderError(f"virtual server {path!r} is not a full path like /Common/vs_web")
    return m.group(1), m.group(2)


@dataclass(frozen=True)
class F5AddressList:
    name: str
    addresses: tuple[str, ...]

    def body(self, partition: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "partition": partition,
            "description": "Stockade peer set",
            "addresses": [{"name": a} for a in self.addresses],
        }


@dataclass(frozen=True)
class F5PortList:
    name: str
    ports: tuple[str, ...]

    def body(self, partition: str) -> dict[str, Any]:
        return {
            "name": self.name,
            "partition": partition,
            "description": "Stockade service ports",
            "ports": [{"name": p} for p in self.ports],
        }


@dataclass(frozen=True)
class F5Rule:
    name: str
    description: str  # the Stockade rule id
    action: str  # "accept" | "drop"
    ip_protocol: str  # "any" | "tcp" | "udp" | "icmp" | "ipv6-icmp"
    source_lists: tuple[str, ...] = ()  # address-list full paths; () = any source
    port_lists: tuple[str, ...] = ()  # port-list full paths; () = any port
    icmp: tuple[str, ...] = ()  # ICMP types; () = any
    log: bool = False

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "action": self.action,
            "ipProtocol": self.ip_protocol,
            "log": "yes" if self.log else "no",
            "status": "enabled",
            "source": {"addressLists": list(self.source_lists)} if self.source_lists else {},
            "destination": {"portLists": list(self.port_lists)} if self.port_lists else {},
        }
        if self.icmp:
            body["icmp"] = [{"name": t} for t in self.icmp]
        return body


@dataclass(frozen=True)
class F5Artifact:
    """The desired AFM state for one virtual server. ``present`` False (idle): none of it."""

    workload: str
    mode: EnforcementMode
    partition: str
    virtual: str  # full path of the virtual server
    prefix: str  # every object Stockade owns for this virtual starts with it
    present: bool
    address_lists: tuple[F5AddressList, ...]
    port_lists: tuple[F5PortList, ...]
    policy_name: str
    rules: tuple[F5Rule, ...]
    enforced: str  # policy full path or "none"
    staged: str

    def policy_body(self) -> dict[str, Any]:
        return {
            "name": self.policy_name,
            "partition": self.partition,
            "description": f"Stockade policy for workload {self.workload}",
            "rules": [r.body() for r in self.rules],
        }

    def virtual_body(self) -> dict[str, Any]:
        return {"fwEnforcedPolicy": self.enforced, "fwStagedPolicy": self.staged}

    def document(self) -> dict[str, Any]:
        return {
            "virtual": self.virtual,
            "mode": self.mode.value,
            "addressLists": [a.body(self.partition) for a in self.address_lists],
            "portLists": [p.body(self.partition) for p in self.port_lists],
            "policy": self.policy_body() if self.present else None,
            "virtualServer": self.virtual_body(),
        }

    def to_text(self) -> str:
        return json.dumps(self.document(), indent=2, sort_keys=True) + "\n"


# ---- rendering ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    ip_protocol: str
    ports: tuple[str, ...] = ()
    icmp: tuple[str, ...] = ()


def service_matches(entries: tuple[ServiceEntry, ...]) -> list[_Match]:
    groups = service_groups(entries)
    if groups is None:
        return [_Match("any")]
    out: list[_Match] = []
    for g in groups:
        name = "ipv6-icmp" if g.proto is Proto.ICMPV6 else g.proto.value
        if g.ranges is None or g.ranges == ((0, PORT_MAX),):
            out.append(_Match(name))
        elif g.proto.is_icmp:
            out.append(_Match(name, icmp=tuple(str(t) for t in g.values)))
        else:
            out.append(_Match(name, tuple(str(a) if a == b else f"{a}-{b}" for a, b in g.ranges)))
    return out


def _addresses(ranges: AddressRanges) -> tuple[str, ...]:
    nets = ranges.networks(Family.V4) + ranges.networks(Family.V6)
    return tuple(str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in nets)


class _Builder:
    def __init__(self, hp: HostPolicy, partition: str, prefix: str) -> None:
        self.hp = hp
        self.partition = partition
        self.prefix = prefix
        self.address_lists: dict[str, F5AddressList] = {}
        self.port_lists: dict[tuple[str, ...], F5PortList] = {}
        self.rules: list[F5Rule] = []

    def source(self, peer: str) -> str | None:
        """The address list for ``peer`` (full path); None when the peer has no member."""
        if not _OBJECT_RE.match(peer):
            raise RenderError(f"address set name {peer!r} is not a valid BIG-IP object name")
        members: list[IPNetwork] = []
        for family in (Family.V4, Family.V6):
            try:
                members.extend(self.hp.set(peer, family).members)
            except KeyError as exc:
                raise RenderError(f"address set {peer} ({family.name}) is missing from the host policy") from exc
        addresses = _addresses(AddressRanges.of(members))
        if not addresses:
            return None
        name = f"{self.prefix}_{peer}"
        self.address_lists.setdefault(name, F5AddressList(name, addresses))
        return full_path(self.partition, name)

    def port_list(self, ports: tuple[str, ...]) -> str:
        if ports not in self.port_lists:
            digest = hashlib.sha256(",".join(ports).encode()).hexdigest()[:10]
            name = f"{self.prefix}_pl_{digest}"
            self.port_lists[ports] = F5PortList(name, ports)
        return full_path(self.partition, self.port_lists[ports].name)

    def add(self, rule_id: str, action: str, sources: tuple[str, ...], matches: list[_Match], log: bool) -> None:
        for m in matches:
            ports = (self.port_list(m.ports),) if m.ports else ()
            name = f"r{len(self.rules) + 1:04d}"
            self.rules.append(F5Rule(name, rule_id, action, m.ip_protocol, sources, ports, m.icmp, log))

    def host_rule(self, rule: HostRule) -> None:
        src = self.source(rule.peer)
        if src is None:
            return
        drop = rule.action is not Action.ALLOW
        self.add(rule.rule_id, "drop" if drop else "accept", (src,), service_matches(rule.services), drop)


def render_f5(hp: HostPolicy, virtual: str) -> F5Artifact:
    """Render ``hp`` for the virtual server ``virtual`` (a full path). Pure."""
    partition, vs_name = validate_virtual(virtual)
    if not _PARTITION_RE.match(partition) or not _OBJECT_RE.match(vs_name):
        raise RenderError(f"invalid virtual server path {virtual!r}")
    prefix = f"stk_{vs_name}"
    policy_name = prefix
    policy_path = full_path(partition, policy_name)
    if hp.mode is EnforcementMode.IDLE:
        return F5Artifact(hp.workload, hp.mode, partition, virtual, prefix, False, (), (), policy_name, (), NONE, NONE)
    b = _Builder(hp, partition, prefix)
    b.add("failsafe:nd", "accept", (), [_Match("ipv6-icmp", icmp=tuple(str(t) for t in ND_TYPES))], False)
    if hp.failsafe.management:
        b.add("failsafe:management", "accept", (), service_matches(hp.failsafe.management), False)
    for rule in hp.rules:
        b.host_rule(rule)
    if hp.mode is EnforcementMode.SELECTIVE:
        b.add("default", "accept", (), [_Match("any")], False)
    else:
        b.add("default", "drop", (), [_Match("any")], True)
    visibility = hp.mode is EnforcementMode.VISIBILITY
    return F5Artifact(
        hp.workload,
        hp.mode,
        partition,
        virtual,
        prefix,
        True,
        tuple(sorted(b.address_lists.values(), key=lambda a: a.name)),
        tuple(sorted(b.port_lists.values(), key=lambda p: p.name)),
        policy_name,
        tuple(b.rules),
        NONE if visibility else policy_path,
        policy_path if visibility else NONE,
    )


def without_controller_failsafe(hp: HostPolicy) -> HostPolicy:
    """The controller path is an agent's outbound failsafe; a virtual server has no agent."""
    return replace(hp, failsafe=replace(hp.failsafe, controller=()))
