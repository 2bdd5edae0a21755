"""Revision + ETag + If-Match on pairing profiles and users, and the migration that adds the users' revision.

Like every policy object: GET answers carry an ``ETag`` header equal to the body's ``etag``,
an effective edit bumps the revision, a stale ``If-Match`` answers 412 with a reason and changes
nothing, a malformed one answers 4xx. On SQLite and PostgreSQL (the ``api`` fixture).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from tests.api.conftest import Api

from stockade.controller.storage.db import MIGRATIONS_DIR, make_engine, migrate

PASSWORD = "correct horse battery"


def _get(api: Api, path: str) -> tuple[dict[str, Any], str]:
    r = api.req("GET", path)
    assert r.status_code == 200, r.text
    etag = r.headers["ETag"]
    assert r.json()["etag"] == etag
    return r.json(), etag


def _events(api: Api, kind: str, name: str) -> int:
    page = api.ok("GET", f"/events?kind={kind}&name={name}&limit=500")
    items = page["items"] if isinstance(page, dict) else page
    return len(items)


def _assert_stale(r: Any) -> None:
    assert r.status_code == 412, r.text
    assert r.json()["error"] == "StaleRevisionError"
    assert "If-Match" in r.json()["message"]


# ---- pairing profiles -------------------------------------------------------------------


def test_pairing_profile_etag_and_if_match(api: Api) -> None:
    created = api.req("POST", "/pairing-profiles", json={"name": "lab", "description": "one"})
    assert created.status_code == 201, created.text
    assert created.json()["revision"] == 1 and created.headers["ETag"] == created.json()["etag"]
    body, etag = _get(api, "/pairing-profiles/lab")
    assert body["revision"] == 1 and etag == created.headers["ETag"]
    listed = api.ok("GET", "/pairing-profiles")
    assert [(p["name"], p["etag"]) for p in listed] == [("lab", etag)]

    edit = {"name": "lab", "description": "two", "max_uses": 5}
    put = api.req("PUT", "/pairing-profiles/lab", json=edit, headers={**api.owner, "If-Match": etag})
    assert put.status_code == 200, put.text
    assert put.json()["revision"] == 2 and put.json()["description"] == "two"
    new_etag = put.headers["ETag"]
    assert new_etag != etag and put.json()["etag"] == new_etag
    after, got = _get(api, "/pairing-profiles/lab")
    assert got == new_etag and after["revision"] == 2

    # the old ETag is stale: 412 with a reason, and nothing changed
    events = _events(api, "pairing_profile", "lab")
    stale = api.req("PUT", "/pairing-profiles/lab", json={"name": "lab", "description": "three"},
                    headers={**api.owner, "If-Match": etag})
    _assert_stale(stale)
    _assert_stale(api.req("DELETE", "/pairing-profiles/lab", headers={**api.owner, "If-Match": etag}))
    unchanged, still = _get(api, "/pairing-profiles/lab")
    assert unchanged == after and still == new_etag
    assert _events(api, "pairing_profile", "lab") == events

    # an identical PUT is not an edit: same revision, same ETag
    same = api.req("PUT", "/pairing-profiles/lab", json=edit, headers={**api.owner, "If-Match": new_etag})
    assert same.status_code == 200 and same.json()["revision"] == 2 and same.headers["ETag"] == new_etag

    # several tags, weak form and "*" are accepted
    listed_tags = f'"0-nothing", W/{new_etag}'
    third = api.req("PUT", "/pairing-profiles/lab", json={"name": "lab", "description": "three"},
                    headers={**api.owner, "If-Match": listed_tags})
    assert third.status_code == 200 and third.json()["revision"] == 3
    star = api.req("PUT", "/pairing-profiles/lab", json={"name": "lab", "description": "four"},
                   headers={**api.owner, "If-Match": "*"})
    assert star.status_code == 200 and star.json()["revision"] == 4

    gone = api.req("DELETE", "/pairing-profiles/lab", headers={**api.owner, "If-Match": star.headers["ETag"]})
    assert gone.status_code == 204
    assert api.req("GET", "/pairing-profiles/lab").status_code == 404


def test_pairing_profile_etag_survives_reload_and_enrolment(api: Api) -> None:
    """A non-UTC expiry is stored as UTC: the PUT's ETag is the one a later GET shows, and an
    enrolment (which counts a use) does not make it stale."""
    expires = dt.datetime.now(dt.timezone(dt.timedelta(hours=5))) + dt.timedelta(days=1)
    api.ok("POST", "/pairing-profiles", 201, json={"name": "p", "expires_at": expires.isoformat()})
    _body, etag = _get(api, "/pairing-profiles/p")
    later = (expires + dt.timedelta(days=1)).isoformat()
    put = api.req("PUT", "/pairing-profiles/p", json={"name": "p", "expires_at": later},
                  headers={**api.owner, "If-Match": etag})
    assert put.status_code == 200, put.text
    body, got = _get(api, "/pairing-profiles/p")
    assert got == put.headers["ETag"] and body["revision"] == 2

    code = api.ok("POST", "/pairing-profiles/p/codes", 201)["code"]
    api.ok("POST", "/agents/enroll", 201, json={"activation_code": code, "hostname": "h1"})
    used, after_enrol = _get(api, "/pairing-profiles/p")
    assert used["uses"] == 1 and after_enrol == got and used["revision"] == 2
    ok = api.req("PUT", "/pairing-profiles/p", json={"name": "p", "expires_at": later, "enabled": False},
                 headers={**api.owner, "If-Match": got})
    assert ok.status_code == 200 and ok.json()["revision"] == 3 and ok.json()["uses"] == 1


def test_pairing_profile_malformed_if_match_is_a_client_error(api: Api) -> None:
    api.ok("POST", "/pairing-profiles", 201, json={"name": "m"})
    for bad in ("garbage", '"unterminated', "", ",,,", 'W/"', "x" * 500):
        for method in ("PUT", "DELETE"):
            r = api.req(method, "/pairing-profiles/m", json={"name": "m", "description": "x"},
                        headers={**api.owner, "If-Match": bad})
            assert 400 <= r.status_code < 500, (method, bad, r.status_code, r.text)
    body, _etag = _get(api, "/pairing-profiles/m")
    assert body["revision"] == 1 and body["description"] == ""


# ---- users -----------------------------------------------------------------------------


def test_user_etag_and_if_match(api: Api) -> None:
    created = api.req("POST", "/users", json={"username": "alice", "password": PASSWORD, "role": "read-only"})
    assert created.status_code == 201, created.text
    assert created.json()["revision"] == 1 and created.headers["ETag"] == created.json()["etag"]
    body, etag = _get(api, "/users/alice")
    assert body["revision"] == 1 and etag == created.headers["ETag"]
    assert {u["username"]: u["etag"] for u in api.ok("GET", "/users")}["alice"] == etag

    put = api.req("PUT", "/users/alice", json={"role": "admin"}, headers={**api.owner, "If-Match": etag})
    assert put.status_code == 200, put.text
    assert put.json()["revision"] == 2 and put.json()["role"] == "admin"
    new_etag = put.headers["ETag"]
    assert new_etag != etag
    after, got = _get(api, "/users/alice")
    assert got == new_etag and after["revision"] == 2

    events = _events(api, "user", "alice")
    _assert_stale(api.req("PUT", "/users/alice", json={"disabled": True}, headers={**api.owner, "If-Match": etag}))
    _assert_stale(api.req("DELETE", "/users/alice", headers={**api.owner, "If-Match": etag}))
    unchanged, still = _get(api, "/users/alice")
    assert unchanged == after and still == new_etag
    assert _events(api, "user", "alice") == events

    # no change: no bump; a password change is an edit even though nothing shown changes
    same = api.req("PUT", "/users/alice", json={"role": "admin"}, headers={**api.owner, "If-Match": new_etag})
    assert same.status_code == 200 and same.json()["revision"] == 2 and same.headers["ETag"] == new_etag
    pw = api.req("PUT", "/users/alice", json={"password": PASSWORD + "!"}, headers={**api.owner, "If-Match": new_etag})
    assert pw.status_code == 200 and pw.json()["revision"] == 3 and pw.headers["ETag"] != new_etag
    login = api.client.post("/api/v1/auth/login", json={"username": "alice", "password": PASSWORD + "!"})
    assert login.status_code == 200
    api.client.cookies.clear()

    gone = api.req("DELETE", "/users/alice", headers={**api.owner, "If-Match": pw.headers["ETag"]})
    assert gone.status_code == 204
    assert api.req("GET", "/users/alice").status_code == 404


def test_user_recreated_gets_a_different_etag(api: Api) -> None:
    first = api.ok("POST", "/users", 201, json={"username": "bob", "password": PASSWORD, "role": "read-only"})
    api.ok("DELETE", "/users/bob", 204)
    second = api.ok("POST", "/users", 201, json={"username": "bob", "password": PASSWORD, "role": "read-only"})
    assert second["revision"] == 1 and second["etag"] != first["etag"]
    _assert_stale(api.req("PUT", "/users/bob", json={"disabled": True},
                          headers={**api.owner, "If-Match": first["etag"]}))


def test_user_malformed_if_match_is_a_client_error(api: Api) -> None:
    api.ok("POST", "/users", 201, json={"username": "carol", "password": PASSWORD, "role": "read-only"})
    for bad in ("garbage", '"unterminated', "", "W/", "x" * 500):
        for method in ("PUT", "DELETE"):
            r = api.req(method, "/users/carol", json={"disabled": True}, headers={**api.owner, "If-Match": bad})
            assert 400 <= r.status_code < 500, (method, bad, r.status_code, r.text)
    body, _etag = _get(api, "/users/carol")
    assert body["revision"] == 1 and body["disabled"] is False


# ---- migration ---------------------------------------------------------------------------


def test_user_revision_migration_on_an_existing_database(database_url: str) -> None:
    """A database at 0004 with a user and a session upgrades in place: revision 1, session kept."""
    engine = make_engine(database_url)
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0004_flow_storage_params")
        now = dt.datetime.now(dt.UTC)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO users (username, password_hash, role, scope, disabled, created_at) "
                                 "VALUES ('old', 'x', 'owner', '[]', false, :t)"), {"t": now})
            conn.execute(sa.text("INSERT INTO sessions (id_hash, username, created_at, expires_at) "
                                 "VALUES ('h', 'old', :t, :t)"), {"t": now})
        migrate(engine)
        migrate(engine)  # idempotent
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT revision FROM users WHERE username = 'old'")).scalar_one() == 1
            assert conn.execute(sa.text("SELECT count(*) FROM sessions")).scalar_one() == 1
            head = ScriptDirectory.from_config(cfg).get_current_head()  # later migrations may follow 0005
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one() == head
    finally:
        engine.dispose()
