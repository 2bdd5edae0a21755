"""``POST /policy/draft/import`` on SQLite and PostgreSQL: imported rules merged into the draft,
audited, authorised, with the report; bad input is a 422 naming the field, never a 500."""

from __future__ import annotations

from pathlib import Path

from tests.api.conftest import Api

CORPUS = Path(__file__).parents[1] / "golden" / "import" / "input"
SAVE = "*filter\n:INPUT DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A INPUT -s 10.70.5.0/24 -p tcp --dport 443 -j ACCEPT\n" \
       "-A INPUT -p tcp --dport 25 -m string --string x --algo bm -j ACCEPT\nnonsense\nCOMMIT\n"


def _body(**kw: object) -> dict[str, object]:
    body: dict[str, object] = {"kind": "iptables", "files": [{"name": "web1.rules", "content": SAVE}],
                               "addresses": {"web1": "10.70.5.10"}}
    body.update(kw)
    return body


def test_import_merges_into_the_draft_with_a_report_and_an_audit_event(api: Api) -> None:
    api.ok("POST", "/services", 201, json={"name": "keepme", "ports": ["8080/tcp"]})
    out = api.ok("POST", "/policy/draft/import", json=_body())
    counts = out["report"]["counts"]
    assert counts["bad input"] == 1 and counts["not expressible"] == 1
    assert any(f["origin"] == "web1.rules:6" for f in out["report"]["findings"])
    assert out["report"]["visibility_hosts"] == ["web1"]
    draft = api.req("GET", "/policy/draft").text
    assert "import-web1" in draft and "keepme" in draft  # merged, nothing else removed
    workload = api.ok("GET", "/workloads/web1")
    assert workload["body"]["mode"] == "visibility"
    events = api.ok("GET", "/events", params={"kind": "ruleset", "name": "import-web1"})["items"]
    assert events and events[0]["actor"]


def test_dry_run_changes_nothing(api: Api) -> None:
    out = api.ok("POST", "/policy/draft/import", json=_body(dry_run=True))
    assert any(c["name"] == "import-web1" for c in out["draft_changes"])
    assert api.req("GET", "/workloads/web1").status_code == 404
    assert "import-web1" not in api.req("GET", "/policy/draft").text


def test_every_corpus_file_imports(api: Api) -> None:
    for kind, name in (("nftables", "nft-host.nft.json"), ("windows", "windows-host.json"),
                       ("illumio", "illumio-pce.json")):
        body = {"kind": kind, "files": [{"name": name, "content": (CORPUS / name).read_text()}]}
        out = api.ok("POST", "/policy/draft/import", json=body)
        assert out["draft_changes"], kind


def test_only_writers_may_import(api: Api) -> None:
    for role in ("read-only", "ruleset-manager"):
        r = api.req("POST", "/policy/draft/import", json=_body(), headers=api.key(role))
        assert r.status_code == 403, (role, r.text)
    assert api.req("GET", "/workloads/web1").status_code == 404


def test_bad_input_is_a_422_naming_the_field(api: Api) -> None:
    r = api.req("POST", "/policy/draft/import", json=_body(kind="pf"))
    assert r.status_code == 422 and "kind" in r.text
    r = api.req("POST", "/policy/draft/import", json=_body(addresses={"web1": "10.70.5.999"}))
    assert r.status_code == 422 and "addresses.web1[0]" in r.text
    r = api.req("POST", "/policy/draft/import", json=_body(files=[]))
    assert r.status_code == 422


def test_a_scoped_admin_cannot_import_rules_for_hosts_outside_its_scope(api: Api) -> None:
    scoped = api.key("admin", ["app=ops"])
    before = api.req("GET", "/policy/draft").text
    r = api.req("POST", "/policy/draft/import", json=_body(), headers=scoped)
    assert r.status_code == 403, r.text
    assert "not available to a label-scoped principal" in r.json()["message"]  # fail closed
    assert api.req("GET", "/policy/draft").text == before
    assert api.req("GET", "/workloads/web1").status_code == 404
