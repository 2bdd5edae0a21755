"""``POST /workload-batches``: many workload upserts and deletes in ONE transaction (the cluster sync's write).

Pod churn reaches the controller as workload writes. One ``PUT``/``DELETE`` per pod is one
transaction each: auth, audit, a compiler pass, a revision bump and a long-poll answer per affected
host, per pod; at 100 pod events per second on a 2-core machine the single writer fell behind (bench/
k8s_fanout.py). The sync already gathers the pods that changed while its previous write was under
way; this route takes them as one batch: one transaction, one ``Compiler.apply_changes`` pass, one
revision per affected host however many of its peers changed (its agent fetches one delta).

Body: ``{"upsert": [workload, ...], "delete": [name, ...]}`` (at most :data:`MAX_ITEMS` together; a
name at most once). Every workload is decoded by the same codec as ``PUT /workloads/{name}``; any
problem refuses the whole batch (422 naming ``upsert[i].field``, 404 for a delete of a missing
workload, 409 for a conflict such as an address another workload holds) and nothing is written,
so the caller can fall back to single writes. Every object is audited as its single write would be.
The rows are written by set-based statements (:mod:`stockade.controller.storage.workload_writes`):
a fixed number of statements per batch, not nine per workload; deletes go before upserts, so a new
pod may take the address of a pod deleted in the same batch.
Needs the write permission; a label-scoped principal's batch is refused when it would change the
policy of a workload outside its scope, exactly as its single writes would be.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from stockade.controller.api.dto.workload_batch import MAX_ITEMS, WorkloadBatchIn, WorkloadBatchOut
from stockade.controller.api.objects import ERRORS, _sync_compiler
from stockade.controller.context import controller_of, require
from stockade.controller.services import scope
from stockade.controller.services.auth import Permission, Principal
from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.storage.workload_writes import write_workloads
from stockade.errors import Issue, ValidationError

router = APIRouter()


def _names(body: WorkloadBatchIn) -> list[str]:
    issues: list[Issue] = []
    if len(body.upsert) + len(body.delete) > MAX_ITEMS:
        issues.append(Issue("api", 0, "upsert", f"at most {MAX_ITEMS} upserts and deletes together"))
    names: list[str] = []
    for i, item in enumerate(body.upsert):
        name = item.get("name")
        if not isinstance(name, str):
            issues.append(Issue("api", 0, f"upsert[{i}].name", "a workload name is required"))
            continue
        names.append(name)
    names += body.delete
    seen: set[str] = set()
    for name in names:
        if name in seen:
            issues.append(Issue("api", 0, "delete" if name in body.delete else "upsert",
                                f"workload {name!r} appears more than once"))
        seen.add(name)
    if issues:
        raise ValidationError(issues)
    return names


def _write(request: Request, body: WorkloadBatchIn, principal: Principal, names: list[str]) -> bytes:
    """The batch's transaction (blocking: in a worker thread); its answer as JSON bytes."""
    ctl = controller_of(request)
    out = WorkloadBatchOut(created=[], replaced=[], deleted=[])

    def run(db: Session, txn: CompilerTxn) -> None:
        earlier = {name: scope.labels_now(ctl.dist, name) for name in names}
        done = write_workloads(db, body.upsert, body.delete, principal.actor)
        for name, after in done.after:  # queued: ONE compiler pass for the batch (CompilerTxn)
            _sync_compiler(txn, db, "workload", name, after)
        out.created, out.replaced, out.deleted = list(done.created), list(done.replaced), list(done.deleted)
        scope.check_deltas(principal, txn, earlier, f"a batch of {len(names)} workload writes")

    ctl.dist.transact(run)
    return out.model_dump_json().encode()


@router.post("/workload-batches", tags=["Workloads"], responses=ERRORS, operation_id="batch-workloads",
             summary="Create, replace and delete workloads in one transaction", response_model=WorkloadBatchOut)
async def batch_workloads(
    request: Request,
    body: WorkloadBatchIn,
    principal: Annotated[Principal, Depends(require(Permission.WRITE))],
) -> Response:
    # async with ONE worker-thread hop, the answer encoded in that thread: a sync route took a second
    # hop after the commit (FastAPI validates a sync route's return value in the thread pool), and each
    # hop waits a turn of the event loop behind the node long-polls this very commit woke
    names = _names(body)
    return Response(await run_in_threadpool(_write, request, body, principal, names), media_type="application/json")
