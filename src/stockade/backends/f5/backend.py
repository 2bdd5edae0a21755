"""The F5 BIG-IP AFM backend: desired state applied through iControl REST, in one transaction.

Applied by the controller for each virtual server that stands as a workload. ``apply``:

1. reads what the device has (GET each object Stockade owns for this virtual server:
   address lists and port lists named ``stk_<vs>_*``, the policy ``stk_<vs>`` with its rules,
   the virtual server's ``fwEnforcedPolicy``/``fwStagedPolicy``) and compares it, field by
   field on what Stockade sets, with the rendered :class:`~stockade.backends.f5.render.F5Artifact`;
2. if nothing differs, does nothing (idempotent: a second apply sends no write);
3. otherwise opens a transaction (``POST /mgmt/tm/transaction``), queues every change with
   the ``X-F5-REST-Coordination-Id`` header (lists created/updated first, then the policy,
   then the virtual server, then deletions of what is no longer wanted), and commits with
   ``PATCH /mgmt/tm/transaction/<id> {"state": "VALIDATING"}``. The device applies all of it
   or none of it; a failure raises ApplyError and the old configuration stays.

``dry_run`` returns the same plan as a readable diff without writing anything. Credentials
come from :class:`~stockade.backends.f5.credentials.EncryptedCredentialStore`; the HTTP
transport is injectable (tests run against the fake in ``tests/fakes/f5_icontrol.py``).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import httpx

from stockade.backends.base import Capability, check_capabilities, check_delta_capabilities
from stockade.backends.f5.render import (
    BACKEND_NAME,
    NONE,
    F5Artifact,
    full_path,
    render_f5,
    rest_id,
    validate_virtual,
    without_controller_failsafe,
)
from stockade.compiler.ir import HostPolicy, SetDelta
from stockade.errors import ApplyError, AuthError, BackendError
from stockade.model.workloads import EnforcementMode

F5_CAPABILITIES = frozenset(Capability) - {
    Capability.OUTBOUND,  # a virtual server only receives connections
    Capability.CONTROLLER_FAILSAFE,  # no agent on the device
    Capability.SET_DELTAS,  # the controller re-applies the desired state (idempotent)
    Capability.ENCRYPT,  # a virtual server has no WireGuard key: encrypted rules fail closed
}
FIREWALL = "/mgmt/tm/security/firewall"
COORDINATION_HEADER = "X-F5-REST-Coordination-Id"
_RULE_FIELDS = ("name", "description", "action", "ipProtocol", "log", "status")


@dataclass(frozen=True)
class F5Change:
    """One queued REST command and the human summary of why."""

    method: str  # "POST" | "PATCH" | "DELETE"
    path: str
    body: dict[str, Any] | None
    summary: str
    detail: str = ""  # a unified diff of the normalised current vs desired object


@dataclass(frozen=True)
class F5Plan:
    changes: tuple[F5Change, ...]

    @property
    def empty(self) -> bool:
        return not self.changes

    def to_text(self) -> str:
        if not self.changes:
            return "no changes\n"
        out: list[str] = []
        for c in self.changes:
            out.append(c.summary)
            if c.detail:
                out.extend("    " + line for line in c.detail.splitlines())
        return "\n".join(out) + "\n"


# ---- normalisation (what Stockade sets, in a comparable form) -----------------------------


def _names(items: Any) -> list[str]:
    return [str(i.get("name")) for i in items or [] if isinstance(i, dict)]


def _address_key(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        return text


def norm_address_list(obj: dict[str, Any]) -> dict[str, Any]:
    return {"addresses": sorted(_address_key(a) for a in _names(obj.get("addresses")))}


def norm_port_list(obj: dict[str, Any]) -> dict[str, Any]:
    return {"ports": sorted(_names(obj.get("ports")))}


def norm_rule(rule: dict[str, Any]) -> dict[str, Any]:
    out = {k: rule.get(k, "") for k in _RULE_FIELDS}
    out["sourceAddressLists"] = sorted((rule.get("source") or {}).get("addressLists") or [])
    out["destinationPortLists"] = sorted((rule.get("destination") or {}).get("portLists") or [])
    out["icmp"] = sorted(_names(rule.get("icmp")))
    return out


def norm_policy(obj: dict[str, Any]) -> dict[str, Any]:
    rules = obj.get("rules")
    if rules is None:
        rules = (obj.get("rulesReference") or {}).get("items") or []
    return {"rules": [norm_rule(r) for r in rules]}


def norm_virtual(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: obj.get(k) or NONE for k in ("fwEnforcedPolicy", "fwStagedPolicy")}


def _diff(current: dict[str, Any] | None, desired: dict[str, Any] | None) -> str:
    a = json.dumps(current, indent=1, sort_keys=True).splitlines() if current is not None else []
    b = json.dumps(desired, indent=1, sort_keys=True).splitlines() if desired is not None else []
    return "\n".join(difflib.unified_diff(a, b, "device", "stockade", n=1, lineterm=""))


# ---- the REST client ----------------------------------------------------------------------


class ICRClient:
    """A thin iControl REST client over httpx (one connection pool per device)."""

    def __init__(
        self,
        base_url: str,
        auth: tuple[str, str],
        *,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.http = httpx.Client(base_url=base_url, auth=auth, verify=verify, transport=transport, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, transaction: int | None = None
    ) -> tuple[int, Any]:
        headers = {COORDINATION_HEADER: str(transaction)} if transaction is not None else {}
        try:
            resp = self.http.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ApplyError(f"iControl REST {method} {path}: {exc}") from exc
        if resp.status_code == 401:
            raise AuthError(f"iControl REST refused the credentials ({method} {path})")
        try:
            data = resp.json() if resp.content else {}
        except ValueError:
            data = {"message": resp.text[:500]}
        return resp.status_code, data

    def get(self, path: str) -> dict[str, Any] | None:
        status, data = self.request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise ApplyError(f"GET {path}: HTTP {status}: {_message(data)}")
        return data if isinstance(data, dict) else {}


def _message(data: Any) -> str:
    return str(data.get("message", data)) if isinstance(data, dict) else str(data)


# ---- the backend ----------------------------------------------------------------------------


class F5Backend:
    """AFM enforcement for one BIG-IP virtual server (``virtual`` is its full path)."""

    name = BACKEND_NAME
    capabilities: frozenset[Capability] = F5_CAPABILITIES

    def __init__(
        self,
        base_url: str,
        virtual: str,
        auth: tuple[str, str],
        *,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.partition, self.vs_name = validate_virtual(virtual)
        self.virtual = virtual
        self.client = ICRClient(base_url, auth, verify=verify, transport=transport)

    def close(self) -> None:
        self.client.close()

    # ---- pure ------------------------------------------------------------------------
    def render(self, host_policy: HostPolicy) -> F5Artifact:
        hp = without_controller_failsafe(host_policy)
        check_capabilities(self.name, self.capabilities, hp)
        return render_f5(hp, self.virtual)

    # ---- planning ----------------------------------------------------------------------
    def _owned(self, kind: str, prefix: str) -> list[str]:
        data = self.client.get(f"{FIREWALL}/{kind}") or {}
        paths = []
        for item in data.get("items", []):
            name, partition = str(item.get("name", "")), str(item.get("partition", "Common"))
            if partition == self.partition and (name == prefix or name.startswith(prefix + "_")):
                paths.append(full_path(partition, name))
        return sorted(paths)

    def plan(self, artifact: F5Artifact) -> F5Plan:
        """The changes that make the device match ``artifact`` (empty when it already does)."""
        if artifact.virtual != self.virtual:
            raise BackendError(f"artifact is for {artifact.virtual}, backend manages {self.virtual}")
        creates: list[F5Change] = []
        deletes: list[F5Change] = []
        p = artifact.partition
        for kind, objs, norm in (
            ("address-list", [(a.name, a.body(p)) for a in artifact.address_lists], norm_address_list),
            ("port-list", [(pl.name, pl.body(p)) for pl in artifact.port_lists], norm_port_list),
        ):
            wanted = {full_path(p, name) for name, _ in objs}
            for name, body in objs:
                path = full_path(p, name)
                item = f"{FIREWALL}/{kind}/{rest_id(path)}"
                current = self.client.get(item)
                if current is None:
                    creates.append(F5Change("POST", f"{FIREWALL}/{kind}", body, f"+ create {kind} {path}",
                                            _diff(None, norm(body))))  # fmt: skip
                elif norm(current) != norm(body):
                    creates.append(F5Change("PATCH", item, body, f"~ update {kind} {path}",
                                            _diff(norm(current), norm(body))))  # fmt: skip
            for path in self._owned(kind, artifact.prefix):
                if path not in wanted:
                    deletes.append(F5Change("DELETE", f"{FIREWALL}/{kind}/{rest_id(path)}", None,
                                            f"- delete {kind} {path}"))  # fmt: skip

        policy_path = full_path(p, artifact.policy_name)
        policy_item = f"{FIREWALL}/policy/{rest_id(policy_path)}"
        current_policy = self.client.get(policy_item + "?expandSubcollections=true")
        policy_changes: list[F5Change] = []
        if artifact.present:
            body = artifact.policy_body()
            if current_policy is None:
                policy_changes.append(F5Change("POST", f"{FIREWALL}/policy", body, f"+ create policy {policy_path}",
                                               _diff(None, norm_policy(body))))  # fmt: skip
            elif norm_policy(current_policy) != norm_policy(body):
                policy_changes.append(F5Change("PATCH", policy_item, {"rules": body["rules"]},
                                               f"~ update policy {policy_path}",
                                               _diff(norm_policy(current_policy), norm_policy(body))))  # fmt: skip
        elif current_policy is not None:
            deletes.insert(0, F5Change("DELETE", policy_item, None, f"- delete policy {policy_path}"))

        vs_item = f"/mgmt/tm/ltm/virtual/{rest_id(self.virtual)}"
        vs = self.client.get(vs_item)
        if vs is None:
            raise ApplyError(f"virtual server {self.virtual} does not exist on the device")
        vs_changes: list[F5Change] = []
        want_vs = artifact.virtual_body()
        if norm_virtual(vs) != norm_virtual(want_vs):
            vs_changes.append(F5Change("PATCH", vs_item, want_vs, f"~ attach policies to virtual {self.virtual}",
                                       _diff(norm_virtual(vs), norm_virtual(want_vs))))  # fmt: skip
        return F5Plan(tuple(creates + policy_changes + vs_changes + deletes))

    def dry_run(self, artifact: F5Artifact) -> F5Plan:
        """What ``apply`` would change, without changing anything."""
        return self.plan(artifact)

    # ---- device ----------------------------------------------------------------------
    def apply(self, artifact: F5Artifact) -> None:
        """Make the device match ``artifact`` in one transaction (no-op when it already does)."""
        plan = self.plan(artifact)
        if not plan.empty:
            self.commit(plan)

    def commit(self, plan: F5Plan) -> None:
        status, data = self.client.request("POST", "/mgmt/tm/transaction", {})
        if status != 200 or "transId" not in data:
            raise ApplyError(f"cannot start an iControl REST transaction: HTTP {status}: {_message(data)}")
        trans = int(data["transId"])
        try:
            for change in plan.changes:
                status, data = self.client.request(change.method, change.path, change.body, transaction=trans)
                if status != 200:
                    raise ApplyError(f"{change.method} {change.path} refused: HTTP {status}: {_message(data)}")
            status, data = self.client.request("PATCH", f"/mgmt/tm/transaction/{trans}", {"state": "VALIDATING"})
        except BaseException:
            self.client.request("DELETE", f"/mgmt/tm/transaction/{trans}")
            raise
        if status != 200 or data.get("state") != "COMPLETED":
            raise ApplyError(f"transaction {trans} failed, nothing was changed: HTTP {status}: {_message(data)}")

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        check_delta_capabilities(self.name, self.capabilities, deltas)

    def read_back(self) -> str:
        """Stockade's objects for this virtual server, normalised, as sorted JSON ("" if none)."""
        doc: dict[str, Any] = {}
        prefix = f"stk_{self.vs_name}"
        for kind, norm in (("address-list", norm_address_list), ("port-list", norm_port_list)):
            for path in self._owned(kind, prefix):
                obj = self.client.get(f"{FIREWALL}/{kind}/{rest_id(path)}")
                if obj is not None:
                    doc[f"{kind} {path}"] = norm(obj)
        policy_path = full_path(self.partition, prefix)
        policy = self.client.get(f"{FIREWALL}/policy/{rest_id(policy_path)}?expandSubcollections=true")
        if policy is not None:
            doc[f"policy {policy_path}"] = norm_policy(policy)
        if not doc:
            return ""
        vs = self.client.get(f"/mgmt/tm/ltm/virtual/{rest_id(self.virtual)}") or {}
        doc[f"virtual {self.virtual}"] = norm_virtual(vs)
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def remove(self) -> None:
        """Detach and delete everything Stockade owns for this virtual server."""
        idle = F5Artifact("", EnforcementMode.IDLE, self.partition, self.virtual, f"stk_{self.vs_name}", False, (), (),
                          f"stk_{self.vs_name}", (), NONE, NONE)  # fmt: skip
        self.apply(idle)
