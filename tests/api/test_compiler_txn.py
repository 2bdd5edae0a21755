"""The controller's CompilerTxn hands a transaction's workload writes to the compiler as ONE batch
(issue 19): same HostPolicies as the writes one by one, one revision per host, exact undo."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from tests.api.conftest import Api, make_settings

from stockade.compiler import Compiler, compile_policy, host_policy_to_dict
from stockade.compiler.changes import SetChanges
from stockade.controller.app import create_app
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.events import record_event
from stockade.model import Workload
from stockade.paths import example_estate

YAML = {"Content-Type": "application/yaml"}


def _estate_yaml() -> str:
    return "\n---\n".join(p.read_text() for p in sorted(example_estate().glob("*.yaml")))


def _workload_doc(name: str, labels: str, addr: int) -> str:
    return (
        f"apiVersion: stockade.io/v1\nkind: Workload\nname: {name}\nlabels: {{{labels}}}\n"
        f"interfaces: [{{name: eth0, addresses: [10.70.9.{addr}, 'fd70::9:{addr:x}']}}]\nmode: full\n"
    )


# new web/app/db hosts, plus a relabel (web-prod-2 becomes an app) and a re-address (db-prod-1)
NEW = [(f"web-new-{i}", "role: web, app: shop, env: prod, loc: lab", 10 + i) for i in range(4)]
NEW += [(f"app-new-{i}", "role: app, app: shop, env: prod, loc: lab", 30 + i) for i in range(3)]
NEW += [("db-new-0", "role: db, app: shop, env: prod, loc: lab", 50)]
CHANGED = [
    ("web-prod-2", "role: app, app: shop, env: prod, loc: lab", 70),
    ("db-prod-1", "role: db, app: shop, env: prod, loc: lab", 99),
]


def _import_text() -> str:
    """The example estate with CHANGED's workloads rewritten and NEW's appended."""
    docs: list[str] = []
    changed = {name for name, _, _ in CHANGED}
    for path in sorted(example_estate().glob("*.yaml")):
        for doc in path.read_text().split("\n---"):
            found = [line for line in doc.splitlines() if line.startswith("name: ")]
            if not (found and found[0][len("name: "):] in changed and "kind: Workload" in doc):
                docs.append(doc.strip("-\n") + "\n")
    return "---\n".join(docs + [_workload_doc(*w) for w in NEW + CHANGED])


def _policies(api: Api) -> dict[str, dict[str, Any]]:
    names = [w["name"] for w in api.ok("GET", "/workloads", params={"limit": 500})["items"]]
    return {n: api.ok("GET", f"/workloads/{n}/host-policy")["policy"] for n in names}


def _count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = Compiler.apply_set_changes  # the compiler pass (host_deltas fans it out)

    def spy(self: Compiler, changes: Iterable[Workload | str]) -> SetChanges:
        batch = list(changes)
        sizes.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(Compiler, "apply_set_changes", spy)
    return sizes


def test_import_is_one_batch_with_the_policies_of_sequential_writes(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.ok("PUT", "/policy/draft", content=_estate_yaml(), headers={**api.owner, **YAML})
    api.ok("POST", "/policy/provision", 201, json={"message": "estate"})
    before_revs = dict(api.ctl.dist.revisions)
    sizes = _count_batches(monkeypatch)
    api.ok("PUT", "/policy/draft", content=_import_text(), headers={**api.owner, **YAML})
    assert sizes == [len(NEW) + len(CHANGED)]  # ten workload writes, one compiler batch
    batched = _policies(api)
    after_revs = api.ctl.dist.revisions
    assert all(after_revs[n] <= before_revs.get(n, 0) + 1 for n in after_revs)  # one revision per host at most

    # the same writes one request at a time, on a second controller
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'sequential.db'}"))
    with TestClient(app) as client:
        seq = Api(client, app.state.controller)
        seq.ok("PUT", "/policy/draft", content=_estate_yaml(), headers={**seq.owner, **YAML})
        seq.ok("POST", "/policy/provision", 201, json={"message": "estate"})
        sizes.clear()
        for name, labels, addr in NEW + CHANGED:
            body = {
                "name": name,
                "mode": "full",
                "labels": dict(part.split(": ") for part in labels.split(", ")),
                "interfaces": [{"name": "eth0", "addresses": [f"10.70.9.{addr}", f"fd70::9:{addr:x}"]}],
            }
            if seq.req("GET", f"/workloads/{name}").status_code == 200:
                old = seq.ok("GET", f"/workloads/{name}")["body"]
                seq.ok("PUT", f"/workloads/{name}", json={**old, **body})
            else:
                seq.ok("POST", "/workloads", 201, json=body)
        assert sizes == [1] * len(NEW + CHANGED)
        sequential = _policies(seq)
        assert set(sequential) == set(batched)
        assert sequential == batched
        scratch = compile_policy(seq.ctl.dist.compiler.policy)
        assert {n: host_policy_to_dict(hp) for n, hp in scratch.items()} == batched


def test_failed_batch_reverts_the_compiler_exactly(api: Api) -> None:
    """A transaction with queued and flushed writes that fails at commit leaves every host as it was."""
    api.ok("PUT", "/policy/draft", content=_estate_yaml(), headers={**api.owner, **YAML})
    api.ok("POST", "/policy/provision", 201, json={"message": "estate"})
    dist = api.ctl.dist
    before = dist.compiler.all_host_policies()
    revs, inventory = dict(dist.revisions), dict(dist.workloads)
    web1 = dist.workloads["web-prod-1"]
    db1 = dist.workloads["db-prod-1"]

    def run(db: Session, txn: CompilerTxn) -> None:
        record_event(db, "test", "noop", "workload", "x", None, None)
        txn.upsert_workload(Workload("brand-new", web1.labels, web1.interfaces[:0], web1.mode))
        txn.remove_workload("web-prod-1")
        assert txn.deltas  # flushes the first batch into the compiler
        txn.upsert_workload(web1)  # a second batch, queued: back again
        txn.upsert_workload(Workload(db1.name, web1.labels, db1.interfaces, db1.mode))
        assert "db-prod-1" in txn.deltas

    def crash(point: str) -> None:
        raise RuntimeError(point)

    dist.fault_hook = crash
    with pytest.raises(RuntimeError, match="before-commit"):
        dist.transact(run)
    dist.fault_hook = None
    assert dist.compiler.all_host_policies() == before
    assert dist.revisions == revs and dist.workloads == inventory

    dist.transact(run)  # the same writes, committed
    assert dist.compiler.all_host_policies() == compile_policy(dist.compiler.policy)
    assert "brand-new" in dist.revisions and dist.revisions["db-prod-1"] == revs["db-prod-1"] + 1
