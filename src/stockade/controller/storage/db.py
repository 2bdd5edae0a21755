"""Relational storage of the controller: SQLAlchemy 2 tables, engine set-up and migrations.

Storage layout (why a generic object table):
every policy, inventory and enrolment kind (label keys, label groups, workloads, IP lists,
services, rulesets, deny rules, the failsafe settings, NetworkPolicies, pairing profiles) shares
one lifecycle: a name, a JSON body
validated by the domain codec (:mod:`stockade.controller.services.codec`), a revision + ETag for
optimistic concurrency, an audit event per change, and (for policy kinds) a copy frozen in
each provisioned version. One ``objects`` table with ``(kind, name)`` unique keeps that
lifecycle in one code path (NetBox's "every resource has the same skeleton") and makes a
version snapshot a plain ``{kind: {name: body}}`` document. The one query that needs to look
inside bodies, filtering workloads by label, is served by the indexed side table
``object_labels``. Kinds with their own life (agents, activation codes, users, keys,
sessions, events, versions, per-host revisions) have their own tables; so has enrolment's use
counter of each pairing profile (``pairing_profile_uses``).

SQLite (the embedded default) runs in WAL mode with foreign keys on; PostgreSQL is selected
by URL. The schema is created and upgraded by Alembic (:func:`migrate`) at start-up.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _ts() -> UTCDateTime:
    return UTCDateTime()


class Base(DeclarativeBase):
    pass


class ObjectRow(Base):
    """One policy or inventory object: ``kind`` + ``name``, a JSON body and its revision."""

    __tablename__ = "objects"
    __table_args__ = (UniqueConstraint("kind", "name", name="uq_objects_kind_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    revision: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)


class ObjectLabelRow(Base):
    """Labels of workload objects, for indexed label filters."""

    __tablename__ = "object_labels"
    __table_args__ = (Index("ix_object_labels_kv", "key", "value"),)

    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(64))


class ObjectAddressRow(Base):
    """Addresses of workload objects: the primary key makes an address belong to one workload."""

    __tablename__ = "object_addresses"

    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), index=True)


class VersionRow(Base):
    """A provisioned, immutable policy version."""

    __tablename__ = "policy_versions"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    author: Mapped[str] = mapped_column(String(128))
    message: Mapped[str] = mapped_column(Text)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    diff: Mapped[list[Any]] = mapped_column(JSON)
    affected: Mapped[list[Any]] = mapped_column(JSON)
    rollback_of: Mapped[int | None] = mapped_column(Integer, nullable=True)


class EventRow(Base):
    """Audit event: who did what to which object, with before/after bodies."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_kind_name", "kind", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    before: Mapped[Any] = mapped_column(JSON, nullable=True)
    after: Mapped[Any] = mapped_column(JSON, nullable=True)


class UserRow(Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(32))
    scope: Mapped[list[Any]] = mapped_column(JSON, default=list)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)


class ApiKeyRow(Base):
    """API key: ``stk_<id>_<secret>``; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    scope: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)


class SessionRow(Base):
    """Web console session; the cookie holds the secret, the table its SHA-256."""

    __tablename__ = "sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(ForeignKey("users.username", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(_ts())


class PairingProfileUsesRow(Base):
    """How many enrolments a pairing profile (an ``objects`` row of kind ``pairing_profile``) has
    counted: enrolment's state, kept outside the profile's body so that it never makes an
    operator's ETag stale."""

    __tablename__ = "pairing_profile_uses"

    object_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), primary_key=True)
    uses: Mapped[int] = mapped_column(Integer, default=0)


class ActivationCodeRow(Base):
    """An activation code: only its SHA-256 is kept. It belongs to one pairing profile object (and
    goes with it: a profile deleted and created again under its name has none of the old codes).
    ``workload`` binds it to one workload name (an adoption code: the only way an enrolment may
    take over an existing workload)."""

    __tablename__ = "activation_codes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    profile_id: Mapped[int] = mapped_column(ForeignKey("objects.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    max_uses: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: codes made before 0008
    uses: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    workload: Mapped[str | None] = mapped_column(String(64), nullable=True)


class AgentRow(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workload: Mapped[str] = mapped_column(String(64), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    profile: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    last_heartbeat: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    applied_revision: Mapped[int] = mapped_column(Integer, default=0)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    public_key: Mapped[str | None] = mapped_column(String(64), nullable=True)  # Ed25519, base64url raw
    quarantined_at: Mapped[dt.datetime | None] = mapped_column(_ts(), nullable=True)
    quarantine_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    held_interfaces: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)  # reported while quarantined
    # PostgreSQL: the transaction that last flushed its ack / heartbeat (replicas read what is new)
    flushed_xid: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)


class WireGuardKeyRow(Base):
    """A workload's registered WireGuard public key (the private key never leaves its host)."""

    __tablename__ = "wireguard_keys"

    workload: Mapped[str] = mapped_column(String(64), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(44), unique=True)  # base64 of 32 bytes
    endpoint: Mapped[str | None] = mapped_column(String(45), nullable=True)  # one of its addresses
    port: Mapped[int] = mapped_column(Integer, default=51820)
    agent_id: Mapped[str] = mapped_column(String(32))
    registered_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)


class HostStateRow(Base):
    """Desired per-host revision and the hash of the HostPolicy it names."""

    __tablename__ = "host_state"

    workload: Mapped[str] = mapped_column(String(64), primary_key=True)
    revision: Mapped[int] = mapped_column(Integer)
    policy_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    change_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True, index=True)  # change_log row of the bump


class ChangeRow(Base):
    """One committed change that other controller replicas must follow (PostgreSQL only): which
    workloads, agents and whether the active policy or the label keys changed. The data itself is
    read from the tables it names (:mod:`stockade.controller.services.replicas`)."""

    __tablename__ = "change_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)
    origin: Mapped[str] = mapped_column(String(64))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class LoginFailureRow(Base):
    """Consecutive failed logins of one account name, shared by the replicas (wall-clock seconds)."""

    __tablename__ = "login_failures"

    username: Mapped[str] = mapped_column(String(256), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure: Mapped[float] = mapped_column(Double)
    locked_until: Mapped[float] = mapped_column(Double)


class RateHitRow(Base):
    """One rate-limited attempt (login, enrolment) by one client, shared by the replicas."""

    __tablename__ = "rate_hits"
    __table_args__ = (Index("ix_rate_hits_key", "scope", "key", "at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    scope: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(128))
    at: Mapped[float] = mapped_column(Double)


class DepartureRow(Base):
    """A workload whose agent was offline past the grace period: compiled without its addresses."""

    __tablename__ = "workload_departures"

    workload: Mapped[str] = mapped_column(String(64), primary_key=True)
    since: Mapped[dt.datetime] = mapped_column(_ts(), default=utcnow)


MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x53_74_6B_00  # pg_advisory_xact_lock around Alembic's upgrade


def _sqlite_pragmas(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (idempotent)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # replicas starting at once: one migrates, the others wait
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def session_factory(engine: Engine) -> sessionmaker[Any]:
    return sessionmaker(engine, expire_on_commit=False)
