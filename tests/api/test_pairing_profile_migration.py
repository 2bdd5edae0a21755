"""Migration 0011 on an existing database: pairing profiles move into ``objects``, codes follow.

A database at 0010 with profiles (labels, a non-UTC expiry, limits, a use count), codes (a plain
one with a known secret, an adoption code, a revoked one) and an enrolled agent is upgraded: each
profile is an object with its canonical body and revision, its use count is kept, the codes refer
to it and still work through the app (the known code enrols; the profile's limit still counts the
uses made before the upgrade). The downgrade rebuilds the old tables with the same content.
On SQLite and PostgreSQL (``database_url``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from tests.api.conftest import Api, make_settings

from stockade.codec import pairing_body
from stockade.controller.app import create_app
from stockade.controller.services import auth
from stockade.controller.storage.db import MIGRATIONS_DIR, UTCDateTime, make_engine, migrate

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
LATER = dt.datetime(2030, 1, 1, 17, 0, tzinfo=dt.timezone(dt.timedelta(hours=5)))


@contextmanager
def _app(url: str) -> Iterator[Api]:
    app = create_app(make_settings(url))
    with TestClient(app) as client:
        yield Api(client, app.state.controller)


def _seed(conn: sa.Connection) -> None:
    """Rows as the app at 0010 wrote them (timestamps through its UTC type)."""
    ins = ("INSERT INTO pairing_profiles (name, labels, mode, expires_at, max_uses, uses, enabled, description, "
           "revision, created_at, code_max_uses, code_ttl_seconds) VALUES (:name, :labels, :mode, :exp, :max, :uses, "
           ":enabled, :desc, :rev, :t, :cmax, :cttl)")
    conn.execute(sa.text(ins).bindparams(sa.bindparam("labels", type_=sa.JSON),
                                         sa.bindparam("exp", type_=UTCDateTime())),
                 [{"name": "web", "labels": {"role": "web", "app": "shop"}, "mode": "full", "exp": LATER, "max": 3,
                   "uses": 2, "enabled": True, "desc": "shop web", "rev": 4, "t": T0, "cmax": 2, "cttl": 3600},
                  {"name": "idle", "labels": {}, "mode": "idle", "exp": None, "max": None, "uses": 0,
                   "enabled": False, "desc": "", "rev": 1, "t": T0, "cmax": 1, "cttl": 86400}])
    codes = ("INSERT INTO activation_codes (id, code_hash, profile, created_at, revoked, max_uses, uses, expires_at, "
             "workload) VALUES (:id, :hash, :profile, :t, :revoked, :max, :uses, :exp, :workload)")
    future = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    conn.execute(sa.text(codes), [
        {"id": "c-plain", "hash": auth.sha256("act_known-plain-code"), "profile": "web", "t": T0, "revoked": False,
         "max": 2, "uses": 0, "exp": future, "workload": None},
        {"id": "c-adopt", "hash": "h2", "profile": "web", "t": T0, "revoked": False, "max": 1, "uses": 0,
         "exp": future, "workload": "db-1"},
        {"id": "c-old", "hash": "h3", "profile": "idle", "t": T0, "revoked": True, "max": 1, "uses": 1,
         "exp": future, "workload": None},
    ])
    conn.execute(sa.text("INSERT INTO agents (id, workload, token_hash, profile, hostname, created_at, "
                         "applied_revision, agent_version) VALUES ('a1', 'w', 't', 'web', 'w', :t, 0, '')"), {"t": T0})


def test_migration_0011_on_an_existing_database(database_url: str) -> None:
    engine = make_engine(database_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0010_wireguard")
        with engine.begin() as conn:
            _seed(conn)
        migrate(engine)
        assert "pairing_profiles" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT o.name, o.body, o.revision, u.uses FROM objects o JOIN "
                                        "pairing_profile_uses u ON u.object_id = o.id "
                                        "WHERE o.kind = 'pairing_profile' ORDER BY o.name")).all()
            codes = dict(conn.execute(sa.text("SELECT c.id, o.name FROM activation_codes c JOIN objects o "
                                              "ON o.id = c.profile_id")).all())
        bodies = {r[0]: (r[1] if isinstance(r[1], dict) else json.loads(r[1])) for r in rows}
        assert [(r[0], r[2], r[3]) for r in rows] == [("idle", 1, 0), ("web", 4, 2)]
        web = pairing_body.decode(bodies["web"])
        assert pairing_body.encode(web) == bodies["web"]  # stored canonical
        assert web.label_map() == {"app": "shop", "role": "web"} and web.mode.value == "full"
        assert web.expires_at == LATER and web.max_uses == 3 and web.description == "shop web"
        assert (web.code_max_uses, web.code_ttl_seconds) == (2, 3600)
        assert pairing_body.decode(bodies["idle"]).enabled is False
        assert codes == {"c-plain": "web", "c-adopt": "web", "c-old": "idle"}

        with _app(database_url) as api:  # the app reads what the migration wrote
            web_out = api.ok("GET", "/pairing-profiles/web")
            assert web_out["uses"] == 2 and web_out["revision"] == 4 and web_out["labels"] == {"app": "shop",
                                                                                               "role": "web"}
            listed = {c["id"]: c for c in api.ok("GET", "/pairing-profiles/web/codes")}
            assert set(listed) == {"c-plain", "c-adopt"} and listed["c-adopt"]["workload"] == "db-1"
            assert api.ok("GET", "/pairing-profiles/idle/codes")[0]["revoked"] is True
            enrolled = api.ok("POST", "/agents/enroll", 201, json={"activation_code": "act_known-plain-code",
                                                                   "hostname": "web-9"})
            assert enrolled["workload"] == "web-9"
            assert api.ok("GET", "/workloads/web-9")["body"]["labels"] == {"app": "shop", "role": "web"}
            assert api.ok("GET", "/pairing-profiles/web")["uses"] == 3  # two before the upgrade, one now
            # the profile's limit (3) counted the uses before the upgrade: the code's second use is refused
            again = api.client.post("/api/v1/agents/enroll", json={"activation_code": "act_known-plain-code",
                                                                    "hostname": "web-10"})
            assert again.status_code == 403 and "pairing profile is used up" in again.text

        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0010_wireguard")
        with engine.connect() as conn:
            back = conn.execute(sa.text("SELECT name, mode, max_uses, uses, enabled, revision, code_max_uses, "
                                        "code_ttl_seconds FROM pairing_profiles ORDER BY name")).all()
            assert [tuple(r) for r in back] == [("idle", "idle", None, 0, False, 1, 1, 86400),
                                                ("web", "full", 3, 3, True, 4, 2, 3600)]
            old_codes = dict(conn.execute(sa.text("SELECT id, profile FROM activation_codes")).all())
            assert old_codes == {"c-plain": "web", "c-adopt": "web", "c-old": "idle"}
            left = conn.execute(sa.text("SELECT count(*) FROM objects WHERE kind = 'pairing_profile'")).scalar_one()
            assert left == 0
        migrate(engine)  # and up again
        with engine.connect() as conn:
            n = conn.execute(sa.text("SELECT count(*) FROM activation_codes c JOIN objects o ON o.id = c.profile_id"
                                     )).scalar_one()
            assert n == 3
    finally:
        engine.dispose()
