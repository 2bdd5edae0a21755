"""WireGuard public keys: registered by each workload's agent, revoked by an operator.

The agent makes its X25519 key pair on the host (the private half never leaves it) and registers
the public half at enrolment and on every rotation, signed like every agent request. The
registration names the endpoint peers should send to, which must be one of the workload's own
addresses. The key is stored in ``wireguard_keys`` (one per workload, unique across workloads)
and given to the compiler through the distributor, so the peers of the workload's encrypted rules
get it in their next HostPolicy; a revoked key leaves every peer the same way.

Every registration, rotation, revocation and refusal is an audit event; a refusal (malformed
key, a key another workload holds, an endpoint that is not the workload's) is a 4xx naming the
field, never a silent fix.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from stockade.controller.services.compiler_txn import CompilerTxn
from stockade.controller.services.distribution import PolicyDistributor, wireguard_identity
from stockade.controller.services.events import record_event
from stockade.controller.storage.db import WireGuardKeyRow, utcnow
from stockade.errors import ConflictError, Issue, NotFoundError, ValidationError
from stockade.model.workloads import validate_public_key

KIND = "workload"


def _refuse(dist: PolicyDistributor, actor: str, workload: str, reason: str, public_key: str) -> None:
    with dist.sessions.begin() as db:
        record_event(db, actor, "wireguard.key_refused", KIND, workload, None,
                     {"reason": reason, "public_key": public_key[:64]})


def register_key(dist: PolicyDistributor, agent_id: str, workload: str, public_key: str,
                 endpoint: str | None, port: int, actor: str) -> bool:
    """Register or rotate ``workload``'s key; True when it changed (the same again is a no-op)."""
    try:
        return _register(dist, agent_id, workload, public_key, endpoint, port, actor)
    except (ValidationError, ConflictError) as exc:
        _refuse(dist, actor, workload, str(exc), public_key)
        raise


def _register(dist: PolicyDistributor, agent_id: str, workload: str, public_key: str,
              endpoint: str | None, port: int, actor: str) -> bool:
    validate_public_key(public_key)
    if not 1 <= port <= 65535:
        raise ValidationError([Issue("api", 0, "port", f"{port} is not a UDP port (1-65535)")])
    w = dist.workloads.get(workload)
    if w is None:
        raise NotFoundError(f"no workload named {workload!r}")
    ep = None
    if endpoint is not None:
        try:
            ep = ipaddress.ip_address(endpoint)
        except ValueError:
            raise ValidationError([Issue("api", 0, "endpoint", f"{endpoint!r} is not an IP address")]) from None
        if ep not in w.addresses:
            raise ValidationError([Issue("api", 0, "endpoint",
                                         f"{ep} is not one of workload {workload}'s addresses")])

    def change(db: Session, txn: CompilerTxn) -> bool:
        holder = db.scalar(select(WireGuardKeyRow).where(WireGuardKeyRow.public_key == public_key))
        if holder is not None and holder.workload != workload:
            raise ConflictError("public_key: this WireGuard key is already registered by another workload")
        row = db.get(WireGuardKeyRow, workload)
        text = str(ep) if ep is not None else None
        if row is not None and (row.public_key, row.endpoint, row.port) == (public_key, text, port):
            return False
        before: dict[str, Any] | None = None
        if row is None:
            row = WireGuardKeyRow(workload=workload, public_key=public_key, endpoint=text, port=port,
                                  agent_id=agent_id, registered_at=utcnow())
            db.add(row)
            action = "wireguard.key_register"
        else:
            before = {"public_key": row.public_key, "endpoint": row.endpoint, "port": row.port}
            action = "wireguard.key_rotate" if row.public_key != public_key else "wireguard.endpoint_change"
            row.public_key, row.endpoint, row.port = public_key, text, port
            row.agent_id, row.registered_at = agent_id, utcnow()
        db.flush()
        record_event(db, actor, action, KIND, workload, before,
                     {"public_key": public_key, "endpoint": text, "port": port, "agent": agent_id})
        txn.set_wireguard_key(workload, wireguard_identity(row))
        return True

    return dist.transact(change)


def revoke_key(dist: PolicyDistributor, workload: str, actor: str) -> bool:
    """Remove ``workload``'s key: every peer drops it with its next revision. False if none."""

    def change(db: Session, txn: CompilerTxn) -> bool:
        row = db.get(WireGuardKeyRow, workload)
        if row is None:
            return False
        record_event(db, actor, "wireguard.key_revoke", KIND, workload,
                     {"public_key": row.public_key, "endpoint": row.endpoint, "port": row.port}, None)
        db.delete(row)
        txn.set_wireguard_key(workload, None)
        return True

    return dist.transact(change)


def key_of(db: Session, workload: str) -> WireGuardKeyRow | None:
    return db.get(WireGuardKeyRow, workload)

