"""``POST /policy/draft/import``: existing firewall rules -> merged into the draft, with the report.

The body names the importer (``kind``: iptables, nftables, windows, illumio; ``networkpolicy``
answers 422 "not available" until it is wired) and carries the files as text. The imported
objects are *added* to the draft (objects of the same kind and name are replaced, others kept)
and its workloads and label keys upserted into the inventory, in one transaction, audited like
``PUT /policy/draft``; ``dry_run`` only answers the report and the changes. Settings are never
changed here (the controller's failsafe stays; the report says so). Needs the write permission;
a scoped principal may only import what stays inside its scope.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from stockade.controller.api.dto.imports import ImportIn, ImportOut
from stockade.controller.api.policy import ERRORS, _change_out, _refuse_nul, _wrap
from stockade.controller.context import controller_of, require
from stockade.controller.services import codec, scope
from stockade.controller.services.auth import Permission, Principal
from stockade.controller.services.codec import INVENTORY_KINDS, POLICY_KINDS
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.versions import diff_content
from stockade.controller.storage import store
from stockade.errors import Issue, ValidationError
from stockade.importers import ImportOptions, Source, report_data, run_import
from stockade.model.addresses import IPAddress

router = APIRouter()


def _addresses(body: ImportIn) -> dict[str, tuple[IPAddress, ...]]:
    out: dict[str, tuple[IPAddress, ...]] = {}
    issues = []
    for host, text in body.addresses.items():
        parsed: list[IPAddress] = []
        for i, v in enumerate(a.strip() for a in text.split(",") if a.strip()):
            try:
                parsed.append(ipaddress.ip_address(v))
            except ValueError:
                issues.append(Issue("api", 0, f"addresses.{host}[{i}]", f"not an IP address: {v[:60]!r}"))
        out[host] = tuple(parsed)
    if issues:
        raise ValidationError(issues)
    return out


@router.post("/policy/draft/import", tags=["Policy"], responses=ERRORS, operation_id="import-rules")
async def import_rules(
    request: Request,
    body: ImportIn,
    principal: Annotated[Principal, Depends(require(Permission.WRITE))],
) -> ImportOut:
    ctl = controller_of(request)
    options = ImportOptions(body.host, _addresses(body), body.backend)
    sources = [Source(f.name, f.content) for f in body.files]
    result = await run_in_threadpool(run_import, body.kind, sources, options)
    objects = codec.objects_of_policy(result.policy)
    _refuse_nul(objects)
    imported = {k: v for k, v in objects.items() if k in POLICY_KINDS and k != "failsafe"}
    workloads = result.policy.workload_map()
    report = report_data(result)

    def run(db: Session, txn: CompilerTxn) -> ImportOut:
        draft = store.draft_revisions(db)
        merged = {k: {**{n: e["body"] for n, e in draft.get(k, {}).items()}, **imported.get(k, {})}
                  for k in POLICY_KINDS if k != "failsafe"}
        inv = store.draft_revisions(db, INVENTORY_KINDS)
        wanted_inv = {k: {**{n: e["body"] for n, e in inv[k].items()}, **objects.get(k, {})} for k in INVENTORY_KINDS}
        out = ImportOut(
            report=report,
            draft_changes=[_change_out(c) for c in diff_content(
                {k: v for k, v in draft.items() if k != "failsafe"}, _wrap(merged, tuple(merged)))],
            inventory_changes=[_change_out(c) for c in diff_content(inv, _wrap(wanted_inv, INVENTORY_KINDS),
                                                                     INVENTORY_KINDS)],
        )
        if body.dry_run:
            return out
        issues = store.validate_draft(db, {**merged, "label_key": wanted_inv["label_key"]})
        if issues:
            raise ValidationError(issues)
        draft_before = scope.draft_snapshot(db) if scope.is_scoped(principal) else {}
        store.put_objects(db, "label_key", wanted_inv["label_key"], principal.actor, prune=False)
        for kind, bodies in imported.items():
            store.put_objects(db, kind, bodies, principal.actor, prune=False)
        changed = store.put_objects(db, "workload", objects.get("workload", {}), principal.actor, prune=False)
        earlier = {name: scope.labels_now(ctl.dist, name) for name in changed}
        txn.refresh_label_keys(wanted_inv["label_key"])
        for name in changed:
            txn.upsert_workload(workloads[name])
        if scope.is_scoped(principal):
            scope.check_deltas(principal, txn, earlier, "importing rules")
            scope.check_policy_change(principal, ctl.dist, draft_before, scope.draft_snapshot(db))
        return out

    return await run_in_threadpool(ctl.dist.transact, run)
