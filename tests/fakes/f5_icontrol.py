"""A FAKE F5 BIG-IP iControl REST service, for tests only. It is not a BIG-IP.

It implements only what Stockade's F5 backend uses, on 127.0.0.1:

* ``/mgmt/tm/security/firewall/address-list``, ``port-list`` and ``policy`` (collections:
  GET, POST; items ``~Partition~name``: GET, PATCH, PUT, DELETE; a policy GET with
  ``expandSubcollections=true`` returns its rules in ``rulesReference.items``);
* ``/mgmt/tm/ltm/virtual/~Partition~name``: GET, PATCH (``fwEnforcedPolicy``,
  ``fwStagedPolicy``); virtual servers are created by the test with :meth:`add_virtual`;
* ``/mgmt/tm/transaction``: POST starts one; a request carrying
  ``X-F5-REST-Coordination-Id`` is queued, not executed; PATCH ``{"state": "VALIDATING"}``
  commits: the queued commands run in order on a copy of the configuration, which replaces
  the live one only if every command succeeds (all or nothing); DELETE discards it.

Bodies are checked against the field shapes of F5's reference (unknown fields, wrong enum
values, malformed addresses/ports/ICMP types, ``icmp`` on a non-ICMP rule, port lists on a
non-TCP/UDP rule are refused with 400) and so is referential integrity (a rule naming a
missing list, deleting a list a policy uses, attaching a missing policy, deleting an attached
policy). Basic authentication is required. ``fail_when`` makes a commit fail on a command
whose path contains the given text, to test rollback.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

KINDS = {"address-list": "addressLists", "port-list": "portLists", "policy": "policies"}
RULE_KEYS = {"name", "description", "action", "ipProtocol", "log", "status", "source", "destination", "icmp"}
ACTIONS = {"accept", "accept-decisively", "drop", "reject"}
PROTOCOLS = {"any", "tcp", "udp", "icmp", "ipv6-icmp", "sctp", "gre"}
SIDE_KEYS = {"addressLists", "addresses", "portLists", "ports"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_PORT_RE = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


class ICRError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Config:
    addressLists: dict[str, dict[str, Any]] = field(default_factory=dict)
    portLists: dict[str, dict[str, Any]] = field(default_factory=dict)
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    virtuals: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Transaction:
    id: int
    commands: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    state: str = "STARTED"


# ---- validation -------------------------------------------------------------------------


def _check_keys(body: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = set(body) - allowed
    if extra:
        raise ICRError(400, f"{what}: unknown properties {sorted(extra)}")


def _check_address(text: str) -> None:
    try:
        if "-" in text:
            lo, hi = (ipaddress.ip_address(x) for x in text.split("-"))
            if lo.version != hi.version or int(lo) > int(hi):
                raise ValueError(text)
        else:
            ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ICRError(400, f"invalid address {text!r}") from exc


def _check_port(text: str) -> None:
    m = _PORT_RE.match(text)
    if not m or int(m.group(1)) > 65535 or (m.group(2) and not int(m.group(1)) <= int(m.group(2)) <= 65535):
        raise ICRError(400, f"invalid port {text!r}")


def _named_items(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(i, dict) and set(i) == {"name"} for i in value):
        raise ICRError(400, f"{what} must be a list of {{\"name\": ...}} objects")
    return [str(i["name"]) for i in value]


def validate_object(kind: str, body: dict[str, Any], cfg: Config, partial: bool = False) -> None:
    base = {"name", "partition", "description"}
    if kind == "address-list":
        _check_keys(body, base | {"addresses"}, kind)
        if "addresses" in body or not partial:
            items = _named_items(body.get("addresses"), "addresses")
            if not items:
                raise ICRError(400, "an address list must contain at least one entry")
            for a in items:
                _check_address(a)
    elif kind == "port-list":
        _check_keys(body, base | {"ports"}, kind)
        if "ports" in body or not partial:
            items = _named_items(body.get("ports"), "ports")
            if not items:
                raise ICRError(400, "a port list must contain at least one entry")
            for p in items:
                _check_port(p)
    else:
        _check_keys(body, base | {"rules"}, kind)
        for rule in body.get("rules", []):
            validate_rule(rule, cfg)
        names = [r.get("name") for r in body.get("rules", [])]
        if len(names) != len(set(names)):
            raise ICRError(400, "duplicate rule names")


def validate_rule(rule: dict[str, Any], cfg: Config) -> None:
    _check_keys(rule, RULE_KEYS, "rule")
    if not isinstance(rule.get("name"), str) or not _NAME_RE.match(rule["name"]):
        raise ICRError(400, f"invalid rule name {rule.get('name')!r}")
    if rule.get("action", "reject") not in ACTIONS:
        raise ICRError(400, f"invalid action {rule.get('action')!r}")
    proto = rule.get("ipProtocol", "any")
    if proto not in PROTOCOLS:
        raise ICRError(400, f"invalid ipProtocol {proto!r}")
    if rule.get("log", "no") not in ("yes", "no") or rule.get("status", "enabled") not in ("enabled", "disabled"):
        raise ICRError(400, "log must be yes/no and status enabled/disabled")
    for side in ("source", "destination"):
        spec = rule.get(side, {})
        if not isinstance(spec, dict):
            raise ICRError(400, f"{side} must be an object")
        _check_keys(spec, SIDE_KEYS, side)
        for path in spec.get("addressLists", []):
            if path not in cfg.addressLists:
                raise ICRError(400, f"address list {path} does not exist")
        for path in spec.get("portLists", []):
            if path not in cfg.portLists:
                raise ICRError(400, f"port list {path} does not exist")
            if proto not in ("tcp", "udp", "sctp"):
                raise ICRError(400, "ports are only valid for TCP, UDP and SCTP rules")
    if "icmp" in rule:
        if proto not in ("icmp", "ipv6-icmp"):
            raise ICRError(400, "icmp is only valid for ICMP rules")
        for t in _named_items(rule["icmp"], "icmp"):
            parts = t.split(":")
            if len(parts) > 2 or not all(p.isdigit() and int(p) <= 255 for p in parts):
                raise ICRError(400, f"invalid icmp type {t!r}")


# ---- the configuration operations ---------------------------------------------------------


def _path(rid: str) -> str:
    return rid.replace("~", "/")


def _ref_lists(cfg: Config) -> set[str]:
    refs: set[str] = set()
    for pol in cfg.policies.values():
        for rule in pol.get("rules", []):
            for side in ("source", "destination"):
                refs.update(rule.get(side, {}).get("addressLists", []))
                refs.update(rule.get(side, {}).get("portLists", []))
    return refs


def execute(cfg: Config, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """One REST command on ``cfg`` (mutates it); raises ICRError."""
    parts = urlsplit(path).path.rstrip("/").split("/")
    if parts[:5] == ["", "mgmt", "tm", "ltm", "virtual"] and len(parts) == 6:
        vs = cfg.virtuals.get(_path(parts[5]))
        if vs is None:
            raise ICRError(404, f"virtual {parts[5]} not found")
        if method == "GET":
            return copy.deepcopy(vs)
        if method != "PATCH" or body is None:
            raise ICRError(405, method)
        _check_keys(body, {"fwEnforcedPolicy", "fwStagedPolicy"}, "virtual")
        for key, value in body.items():
            if value not in ("none", "") and value not in cfg.policies:
                raise ICRError(400, f"policy {value} does not exist")
            if value in ("none", ""):
                vs.pop(key, None)
            else:
                vs[key] = value
        return copy.deepcopy(vs)
    if parts[:5] != ["", "mgmt", "tm", "security", "firewall"] or len(parts) not in (6, 7) or parts[5] not in KINDS:
        raise ICRError(404, f"no such endpoint {path}")
    kind = parts[5]
    store: dict[str, dict[str, Any]] = getattr(cfg, KINDS[kind])
    if len(parts) == 6:
        if method == "GET":
            return {"items": [copy.deepcopy(v) for _, v in sorted(store.items())]}
        if method != "POST" or body is None:
            raise ICRError(405, method)
        full = f"/{body.get('partition', 'Common')}/{body.get('name')}"
        if not isinstance(body.get("name"), str) or not _NAME_RE.match(body["name"]):
            raise ICRError(400, f"invalid name {body.get('name')!r}")
        if full in store:
            raise ICRError(409, f"{kind} {full} already exists")
        validate_object(kind, body, cfg)
        store[full] = {**copy.deepcopy(body), "partition": body.get("partition", "Common"), "fullPath": full}
        return copy.deepcopy(store[full])
    full = _path(parts[6])
    if full not in store:
        raise ICRError(404, f"{kind} {full} not found")
    if method == "GET":
        return copy.deepcopy(store[full])
    if method == "DELETE":
        if kind != "policy" and full in _ref_lists(cfg):
            raise ICRError(400, f"{kind} {full} is in use by a firewall policy")
        if kind == "policy" and any(full in vs.values() for vs in cfg.virtuals.values()):
            raise ICRError(400, f"policy {full} is attached to a virtual server")
        del store[full]
        return {}
    if method in ("PATCH", "PUT") and body is not None:
        validate_object(kind, body, cfg, partial=method == "PATCH")
        updated = {**store[full], **copy.deepcopy(body)} if method == "PATCH" else {**copy.deepcopy(body)}
        updated.update(name=store[full]["name"], partition=store[full]["partition"], fullPath=full)
        store[full] = updated
        return copy.deepcopy(updated)
    raise ICRError(405, method)


# ---- the HTTP service ---------------------------------------------------------------------


class FakeICR:
    """The fake device: its configuration, open transactions, and a request log."""

    def __init__(self, username: str = "admin", password: str = "secret") -> None:
        self.config = Config()
        self.transactions: dict[int, Transaction] = {}
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.fail_when: str | None = None
        self.auth = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self._next_id = 1000

    def add_virtual(self, path: str, destination: str = "10.1.0.10:443") -> None:
        self.config.virtuals[path] = {"name": path.rsplit("/", 1)[1], "fullPath": path, "destination": destination}

    def handle(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None) -> tuple[int, Any]:
        self.requests.append((method, path))
        if headers.get("authorization") != self.auth:
            return 401, {"code": 401, "message": "Authorization failed"}
        try:
            with self.lock:
                return 200, self._route(method, path, headers, body)
        except ICRError as exc:
            return exc.status, {"code": exc.status, "message": str(exc)}

    def _route(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any] | None) -> Any:
        url = urlsplit(path)
        parts = url.path.rstrip("/").split("/")
        if parts[:4] == ["", "mgmt", "tm", "transaction"]:
            return self._transaction(method, parts, body)
        trans = headers.get("x-f5-rest-coordination-id")
        if trans is not None and method != "GET":
            t = self.transactions.get(int(trans))
            if t is None or t.state != "STARTED":
                raise ICRError(400, f"transaction {trans} is not open")
            t.commands.append((method, path, copy.deepcopy(body)))
            return {"transId": t.id, "evalOrder": len(t.commands), "method": method, "uri": path}
        result = execute(self.config, method, path, body)
        if method == "GET" and parts[5:6] == ["policy"] and len(parts) == 7:
            if parse_qs(url.query).get("expandSubcollections") == ["true"]:
                result["rulesReference"] = {"items": result.pop("rules", []), "isSubcollection": True}
            else:
                result.pop("rules", None)
                result["rulesReference"] = {"link": f"https://localhost{url.path}/rules", "isSubcollection": True}
        return result

    def _transaction(self, method: str, parts: list[str], body: dict[str, Any] | None) -> Any:
        if len(parts) == 4 and method == "POST":
            self._next_id += 1
            self.transactions[self._next_id] = Transaction(self._next_id)
            return {"transId": self._next_id, "state": "STARTED", "timeoutSeconds": 120}
        t = self.transactions.get(int(parts[4])) if len(parts) == 5 else None
        if t is None:
            raise ICRError(404, "no such transaction")
        if method == "DELETE":
            del self.transactions[t.id]
            return {}
        if method == "GET":
            return {"transId": t.id, "state": t.state, "commandCount": len(t.commands)}
        if method != "PATCH" or body != {"state": "VALIDATING"}:
            raise ICRError(400, "only {'state': 'VALIDATING'} commits a transaction")
        if t.state != "STARTED":
            raise ICRError(400, f"transaction {t.id} is {t.state}")
        candidate = copy.deepcopy(self.config)
        for i, (m, p, b) in enumerate(t.commands):
            try:
                if self.fail_when is not None and self.fail_when in p:
                    raise ICRError(400, f"injected failure on {m} {p}")
                execute(candidate, m, p, b)
            except ICRError as exc:
                t.state = "FAILED"
                raise ICRError(400, f"transaction failed at command {i + 1} ({m} {p}): {exc}") from exc
        self.config = candidate
        t.state = "COMPLETED"
        return {"transId": t.id, "state": "COMPLETED"}


def _handler(device: FakeICR) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                status, answer = 400, {"code": 400, "message": "invalid JSON"}
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, answer = device.handle(method, self.path, headers, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PATCH(self) -> None:
            self._serve("PATCH")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def running_fake_icr(device: FakeICR | None = None) -> Iterator[tuple[FakeICR, str]]:
    """Serve a fake device on 127.0.0.1 (a free port); yields (device, base URL)."""
    device = device or FakeICR()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(device))
    thread = threading.Thread(target=server.serve_forever, name="fake-icontrol", daemon=True)
    thread.start()
    try:
        yield device, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
