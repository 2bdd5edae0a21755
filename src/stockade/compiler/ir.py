"""HostPolicy: the compiled, per-workload intermediate representation.

Frozen, totally ordered and sorted, so the same inputs give byte-identical JSON.
Rules reference address sets by name; a peer joining or leaving changes set members,
never rule text. Rules are sorted by ``Action`` first, so walking them in order is
first-match evaluation with Illumio's precedence: override-deny > allow > deny.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, fields
from enum import Enum
from itertools import chain
from typing import TYPE_CHECKING, Any, TypeVar

from stockade.errors import Issue, ValidationError
from stockade.model.addresses import Family, IPAddress, IPNetwork
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import BACKEND_NAMES, EnforcementMode, validate_public_key

_T = TypeVar("_T")


def unchecked(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of the frozen dataclass ``cls`` built from ``fields`` without its ``__init__``.

    For the compiler's hot loops only (hundreds of thousands of ``HostPolicy``/``AddressSet``
    objects per full compile): a frozen dataclass's generated ``__init__`` sets each field with
    ``object.__setattr__``, twice the cost of filling the instance dict at once. Only for classes
    without ``__post_init__`` (nothing to validate: the inputs were validated at the edge), and
    ``fields`` must name every field; equality, hashing and order are the dataclass's own.
    """
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


class Direction(Enum):
    INBOUND = "in"  # peer is the source, this host the destination
    OUTBOUND = "out"  # this host is the source, peer the destination

    def __lt__(self, other: Direction) -> bool:
        return self.value < other.value


@dataclass(frozen=True, order=True)
class AddressSet:
    """Members of one peer selector in one family, as minimal sorted CIDRs.

    The compiler may make one with its members held as chunks (``chunked_address_set``): the
    ``members`` tuple is then joined on first read and kept. Reading it, equality, hashing and
    order are the same either way; only the moment the flat tuple is built differs."""

    name: str  # stable: hash of the canonical selector (same name in both families)
    family: Family
    members: tuple[IPNetwork, ...]
    selector: str = ""  # canonical selector text, for humans

    if not TYPE_CHECKING:  # hidden from mypy: it would otherwise accept any attribute name

        def __getattr__(self, attr: str) -> Any:
            # only called for an attribute missing from the instance dict: ``members`` of a chunked set
            if attr == "members":
                d = self.__dict__
                chunks = d.get("_chunks")
                if chunks is not None:  # kept after the join: the encoder memoizes text per chunk
                    members = chunks[0] if len(chunks) == 1 else tuple(chain.from_iterable(chunks))
                    d["members"] = members
                    return members
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")


def chunked_address_set(
    name: str, family: Family, chunks: tuple[tuple[IPNetwork, ...], ...], selector: str
) -> AddressSet:
    """An ``AddressSet`` whose members are the concatenation of ``chunks`` (each sorted, in order),
    joined into the ``members`` tuple on first read.

    For the compiler's incremental changes: a created or re-addressed host's own policy references
    the sets that just changed (the all-workloads set among them, 125,000 networks at the largest
    estates); holding the set's chunks costs O(chunks) where the flat tuple costs O(members), and
    hosts share the one ``AddressSet`` object, so the tuple is joined at most once per change of
    the set, by its first reader (a renderer or encoder, which reads every member anyway)."""
    obj = object.__new__(AddressSet)
    obj.__dict__.update({"name": name, "family": family, "selector": selector, "_chunks": chunks})
    return obj


def address_set_chunks(s: AddressSet) -> tuple[tuple[IPNetwork, ...], ...]:
    """The members of ``s`` as consecutive chunks, without joining them (one chunk if already joined)."""
    chunks: tuple[tuple[IPNetwork, ...], ...] | None = s.__dict__.get("_chunks")
    return chunks if chunks is not None else (s.members,)


@dataclass(frozen=True, slots=True)
class HostRule:
    """One rule on one host. Ordered by action, direction, encrypted allows first, then rule id:
    first-match over that order is the evaluator's precedence, where an encrypted allow wins over
    a plain one (a plain allow never carries in the clear what another rule says to encrypt).

    Slotted: a full compile at 125,000 workloads holds half a million of them (88 bytes each
    instead of 336 with an instance dict; the memory was a tenth of the compile's CPU in page
    faults)."""

    action: Action
    direction: Direction
    rule_id: str  # "ruleset/<name>/<index>" or "deny/<name>"
    peer: str  # AddressSet name
    services: tuple[ServiceEntry, ...]
    encrypt: bool = False  # allow only through the WireGuard tunnel with the peer

    def sort_key(self) -> tuple[Action, Direction, bool, str, str, tuple[ServiceEntry, ...]]:
        return self.action, self.direction, not self.encrypt, self.rule_id, self.peer, self.services

    def __lt__(self, other: HostRule) -> bool:
        return self.sort_key() < other.sort_key()

    def __le__(self, other: HostRule) -> bool:
        return self.sort_key() <= other.sort_key()

    def __gt__(self, other: HostRule) -> bool:
        return self.sort_key() > other.sort_key()

    def __ge__(self, other: HostRule) -> bool:
        return self.sort_key() >= other.sort_key()


_SET_ACTION, _SET_DIRECTION, _SET_RULE_ID, _SET_PEER, _SET_SERVICES, _SET_ENCRYPT = (
    getattr(HostRule, f.name).__set__ for f in fields(HostRule)
)


def make_host_rule(
    action: Action, direction: Direction, rule_id: str, peer: str, services: tuple[ServiceEntry, ...],
    encrypt: bool,
) -> HostRule:
    """``HostRule(...)`` with every field given, filling the slots through their descriptors: what the
    generated frozen ``__init__`` does with one ``object.__setattr__`` call per field, at about 70% of
    its cost (``build_rule_table`` makes 508,000 of them at 125,000 workloads)."""
    rule = _new_object(HostRule)
    _SET_ACTION(rule, action)
    _SET_DIRECTION(rule, direction)
    _SET_RULE_ID(rule, rule_id)
    _SET_PEER(rule, peer)
    _SET_SERVICES(rule, services)
    _SET_ENCRYPT(rule, encrypt)
    return rule


_new_object = object.__new__


@dataclass(frozen=True)
class WireGuardPeer:
    """A workload this host runs a tunnel with: who holds the key, where to send, what it may source."""

    workload: str
    public_key: str  # base64, 32 bytes
    endpoint: IPAddress
    port: int
    allowed: tuple[IPNetwork, ...]  # the peer's own addresses as /32 and /128 (cryptokey routing)


@dataclass(frozen=True)
class WireGuardConfig:
    """The tunnel side of a HostPolicy: present only on hosts with encrypted rules."""

    listen_port: int
    peers: tuple[WireGuardPeer, ...]  # sorted by workload name


@dataclass(frozen=True)
class PeerDelta:
    """Tunnel peers changed between two revisions of one host (rules unchanged): ``upserted``
    peers are set (added, or replaced: rotated key, new endpoint or addresses), ``removed``
    workloads' peers are deleted. Keyed by workload, each entry the whole peer, so applying it
    is exact whatever the order of deltas composed into it (see ``compiler.delta``)."""

    upserted: tuple[WireGuardPeer, ...] = ()  # sorted by workload
    removed: tuple[str, ...] = ()  # workload names, sorted

    def __bool__(self) -> bool:
        return bool(self.upserted or self.removed)


@dataclass(frozen=True)
class HostPolicy:
    workload: str
    mode: EnforcementMode
    local_addresses: tuple[IPAddress, ...]
    rules: tuple[HostRule, ...]
    sets: tuple[AddressSet, ...]
    failsafe: Failsafe
    wireguard: WireGuardConfig | None = None  # None: no encrypted rule applies to this host
    # The backend the controller wants this host's agent to enforce with (the workload's setting;
    # None: the agent's own --backend). It selects the renderer only: the same rules, whichever.
    backend: str | None = None

    def set(self, name: str, family: Family) -> AddressSet:
        for s in self.sets:
            if s.name == name and s.family is family:
                return s
        raise KeyError((name, family))

    def rules_key(self) -> tuple[object, ...]:
        """Everything except set members: equal keys mean set deltas alone lead from one to the
        other (renderers use the local addresses too, so a re-addressed host needs a reload)."""
        return (
            self.workload,
            self.mode,
            self.local_addresses,
            self.rules,
            self.failsafe,
            tuple((s.name, s.family) for s in self.sets),
            # the tunnel's port, not its peers: rendered rules never name a peer (the WireGuard UDP
            # guard matches the encrypted rules' peer sets), so a peer change is a peer delta
            None if self.wireguard is None else self.wireguard.listen_port,
            self.backend,  # a backend change is a full policy: the agent switches make-before-break
        )


@dataclass(frozen=True, order=True)
class SetDelta:
    name: str
    family: Family
    added: tuple[IPNetwork, ...]
    removed: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class HostDelta:
    """What changed for one host. ``rules_changed`` means a full reload is needed; otherwise
    ``set_deltas`` and, when ``peers_changed``, the peer difference lead from the previous policy
    to ``policy`` exactly (see ``compiler.delta``)."""

    workload: str
    policy: HostPolicy | None  # None: the workload is gone
    rules_changed: bool
    set_deltas: tuple[SetDelta, ...]
    peers_changed: bool = False  # WireGuard peers differ too (a peer delta; rules unchanged)


# ---- JSON ------------------------------------------------------------------

def _entry_dict(e: ServiceEntry) -> dict[str, Any]:
    return {"proto": e.proto.value, "first": e.first, "last": e.last}


def rules_to_list(rules: tuple[HostRule, ...]) -> list[dict[str, Any]]:
    return [
        {
            "action": r.action.value,
            "direction": r.direction.value,
            "rule_id": r.rule_id,
            "peer": r.peer,
            "services": [_entry_dict(e) for e in r.services],
            **({"encrypt": True} if r.encrypt else {}),
        }
        for r in rules
    ]


# The compiler shares one AddressSet object between every host that references it, so when a change
# wakes N hosts their answers encode the same sets N times. The members' text (the cost: one
# ``str`` per network) is kept per object, by identity, for the most recent sets; each answer still
# gets its own list. The entry holds the set itself, so an id is never reused while it is cached.
_MEMBERS_MEMO: dict[int, tuple[AddressSet, tuple[str, ...]]] = {}
_MEMBERS_MEMO_MAX = 4096


# A set changed by a workload change holds its members as chunks (``chunked_address_set``); all but
# the changed chunk are the objects the set's previous version held, so their text is kept per chunk
# (by identity, holding the chunk) and a changed 125,000-member set is re-spelled one chunk at a time.
_CHUNK_TEXTS: dict[int, tuple[tuple[IPNetwork, ...], tuple[str, ...]]] = {}
_CHUNK_TEXTS_MAX = 1 << 20  # texts held (about 60 MB of strings), then the memo starts over
_chunk_texts_held = 0


def _chunk_texts(chunk: tuple[IPNetwork, ...]) -> tuple[str, ...]:
    global _chunk_texts_held
    hit = _CHUNK_TEXTS.get(id(chunk))
    if hit is not None and hit[0] is chunk:
        return hit[1]
    texts = tuple(map(str, chunk))
    if _chunk_texts_held + len(texts) > _CHUNK_TEXTS_MAX:
        _CHUNK_TEXTS.clear()
        _chunk_texts_held = 0
    _CHUNK_TEXTS[id(chunk)] = (chunk, texts)
    _chunk_texts_held += len(texts)
    return texts


def _member_texts(s: AddressSet) -> tuple[str, ...]:
    hit = _MEMBERS_MEMO.get(id(s))
    if hit is not None and hit[0] is s:
        return hit[1]
    chunks = address_set_chunks(s)
    if len(chunks) > 1:
        texts = tuple(chain.from_iterable(map(_chunk_texts, chunks)))
    else:
        texts = tuple(str(m) for m in s.members)
    if len(_MEMBERS_MEMO) >= _MEMBERS_MEMO_MAX:
        _MEMBERS_MEMO.clear()  # the sets of the current revisions come back at once
    _MEMBERS_MEMO[id(s)] = (s, texts)
    return texts


def address_set_to_dict(s: AddressSet) -> dict[str, Any]:
    return {"name": s.name, "family": s.family.value, "selector": s.selector, "members": list(_member_texts(s))}


def host_policy_to_dict(hp: HostPolicy) -> dict[str, Any]:
    return {
        "workload": hp.workload,
        "mode": hp.mode.value,
        "local_addresses": [str(a) for a in hp.local_addresses],
        "failsafe": {
            "controller": [str(n) for n in hp.failsafe.controller],
            "controller_port": hp.failsafe.controller_port,
            "management": [_entry_dict(e) for e in hp.failsafe.management],
        },
        "rules": rules_to_list(hp.rules),
        "sets": [address_set_to_dict(s) for s in hp.sets],
        **({"wireguard": wireguard_to_dict(hp.wireguard)} if hp.wireguard is not None else {}),
        **({"backend": hp.backend} if hp.backend is not None else {}),
    }


def peer_to_dict(p: WireGuardPeer) -> dict[str, Any]:
    return {
        "workload": p.workload,
        "public_key": p.public_key,
        "endpoint": str(p.endpoint),
        "port": p.port,
        "allowed": [str(n) for n in p.allowed],
    }


def peer_from_dict(p: dict[str, Any], field: str = "wireguard.peers") -> WireGuardPeer:
    return WireGuardPeer(
        str(p["workload"]),
        validate_public_key(str(p["public_key"]), f"{field}.public_key"),
        ipaddress.ip_address(p["endpoint"]),
        int(p["port"]),
        tuple(ipaddress.ip_network(n) for n in p["allowed"]),
    )


def wireguard_to_dict(wg: WireGuardConfig) -> dict[str, Any]:
    return {"listen_port": wg.listen_port, "peers": [peer_to_dict(p) for p in wg.peers]}


def wireguard_from_dict(d: dict[str, Any]) -> WireGuardConfig:
    return WireGuardConfig(int(d["listen_port"]), tuple(peer_from_dict(p) for p in d["peers"]))


def host_policy_to_json(hp: HostPolicy) -> str:
    return json.dumps(host_policy_to_dict(hp), indent=2, sort_keys=True) + "\n"


def _entry(d: dict[str, Any]) -> ServiceEntry:
    return ServiceEntry(Proto(d["proto"]), d["first"], d["last"])


def wire_key(name: object, family: object, *texts: object) -> tuple[object, ...] | None:
    """A memo key for a set's wire content, or None unless it is plain JSON text: a name, an int
    family, then strings or lists of strings (keys equal only when the texts are, so an entry
    never answers for content that would decode differently, e.g. ``1`` for ``1.0``)."""
    if type(name) is not str or type(family) is not int:
        return None
    key: list[object] = [name, family]
    for t in texts:
        if type(t) is str:
            key.append(t)
        elif type(t) is list and all(type(x) is str for x in t):
            key.append(tuple(t))
        else:
            return None
    return tuple(key)


def _address_set_from_dict(s: dict[str, Any]) -> AddressSet:
    return AddressSet(s["name"], Family(s["family"]), tuple(ipaddress.ip_network(m) for m in s["members"]),
                      s.get("selector", ""))


def _shared_address_set(s: dict[str, Any], shared: dict[object, AddressSet]) -> AddressSet:
    """``_address_set_from_dict(s)``, decoded once per distinct wire content in ``shared``."""
    key = wire_key(s.get("name"), s.get("family"), s.get("members"), s.get("selector", ""))
    if key is None:  # not plain wire text: decoded (and refused, if malformed) on its own
        return _address_set_from_dict(s)
    hit = shared.get(key)
    if hit is None:
        hit = shared[key] = _address_set_from_dict(s)
    return hit


def host_policy_from_dict(d: dict[str, Any], shared: dict[object, AddressSet] | None = None) -> HostPolicy:
    """Decode a HostPolicy. ``shared``: address sets already decoded from other policies of the same
    answer, by their wire content (the pods of a node share most of their sets; a set equal on the
    wire decodes to one frozen :class:`AddressSet`, not one per pod)."""
    fs = d["failsafe"]
    return HostPolicy(
        workload=d["workload"],
        mode=EnforcementMode(d["mode"]),
        local_addresses=tuple(ipaddress.ip_address(a) for a in d["local_addresses"]),
        failsafe=Failsafe(
            controller=tuple(ipaddress.ip_network(n) for n in fs["controller"]),
            controller_port=int(fs["controller_port"]),
            management=tuple(_entry(e) for e in fs["management"]),
        ),
        rules=tuple(
            HostRule(
                Action(r["action"]),
                Direction(r["direction"]),
                r["rule_id"],
                r["peer"],
                tuple(_entry(e) for e in r["services"]),
                bool(r.get("encrypt", False)),
            )
            for r in d["rules"]
        ),
        sets=tuple(_address_set_from_dict(s) if shared is None else _shared_address_set(s, shared)
                   for s in d["sets"]),
        wireguard=wireguard_from_dict(d["wireguard"]) if d.get("wireguard") is not None else None,
        backend=_backend_from(d.get("backend")),
    )


def _backend_from(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in BACKEND_NAMES:
        raise ValidationError([Issue("policy", 0, "backend", f"unknown backend {str(value)[:40]!r}")])
    return value


def host_policy_from_json(text: str) -> HostPolicy:
    return host_policy_from_dict(json.loads(text))
