"""Response headers, the docs page, 405s and the empty policy import (issue 12, item 12 and the
schemathesis findings).

* no Swagger UI (it loaded JavaScript from a CDN into the controller's origin); the OpenAPI
  document stays at ``/api/v1/openapi.json``;
* every response of every published operation, of the console and of refusals made before
  routing (413, 422) carries CSP, nosniff, no-referrer and no framing; HSTS on TLS only;
* a 405 lists every method the path answers (derived from the OpenAPI document);
* an empty YAML (or no body) sent to ``PUT /policy/draft``, dry run or not, is a 422 unless
  ``allow_empty=true`` confirms it; it never silently deletes the whole policy.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import Api
from tests.security.openapi_walk import fill_path, operations

REQUIRED = {
    "content-security-policy": None,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


def _missing(headers: Any) -> list[str]:
    out = []
    for name, value in REQUIRED.items():
        if name not in headers or (value is not None and headers[name] != value):
            out.append(name)
    csp = headers.get("content-security-policy", "")
    if "default-src 'none'" not in csp and "default-src 'self'" not in csp:
        out.append("csp default-src")
    if "frame-ancestors 'none'" not in csp:
        out.append("csp frame-ancestors")
    return out


def test_no_swagger_ui_but_the_openapi_document(sqlite_api: Api) -> None:
    c = sqlite_api.client
    for path in ("/api/v1/docs", "/docs", "/redoc", "/docs/oauth2-redirect"):
        r = c.get(path)
        assert "swagger" not in r.text.lower() and "cdn.jsdelivr" not in r.text, path
    assert c.get("/api/v1/docs").status_code == 404
    assert c.get("/api/v1/openapi.json").json()["openapi"].startswith("3.")


def test_every_response_carries_the_security_headers(sqlite_api: Api) -> None:
    api = sqlite_api
    spec = api.client.app.openapi()  # type: ignore[attr-defined]
    failures: list[tuple[Any, ...]] = []
    for op in operations(spec):
        if op.path.endswith(("/unenroll", "/revoke", "/logout")):
            continue
        url = fill_path(op.path, {})
        for headers in (api.owner, {}):
            r = api.client.request(op.method, url, headers=headers, params={"timeout": 0})
            if _missing(r.headers):
                failures.append((op.method, op.path, r.status_code, _missing(r.headers)))
            if r.headers.get("cache-control") != "no-store":
                failures.append((op.method, op.path, r.status_code, "cache-control"))
    # the console, refusals made before routing, unknown paths
    extra: list[tuple[str, str, bytes | None]] = [("GET", "/", None), ("GET", "/api/v1/nope", None),
                                                  ("POST", "/api/v1/auth/login", b"x" * 100_000),
                                                  ("GET", "/api/v1/services?name=%00", None)]
    for method, path, content in extra:
        r = api.client.request(method, path, content=content)
        if _missing(r.headers):
            failures.append((method, path, r.status_code, _missing(r.headers)))
    assert failures == []


def test_hsts_only_over_tls(sqlite_api: Api) -> None:
    app = sqlite_api.client.app
    plain = sqlite_api.client.get("/api/v1/openapi.json")
    assert "strict-transport-security" not in plain.headers
    with TestClient(app, base_url="https://controller.test") as tls:
        for path in ("/", "/api/v1/openapi.json", "/api/v1/auth/whoami"):
            hsts = tls.get(path).headers.get("strict-transport-security", "")
            assert hsts.startswith("max-age=") and int(hsts.split("=")[1].split(";")[0]) >= 31536000, path


def test_405_lists_every_allowed_method(sqlite_api: Api) -> None:
    api = sqlite_api
    spec = api.client.app.openapi()  # type: ignore[attr-defined]
    by_path: dict[str, set[str]] = {}
    for op in operations(spec):
        by_path.setdefault(op.path, set()).add(op.method)
    failures = []
    for path, methods in by_path.items():
        absent = sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - methods)
        if not absent:
            continue
        r = api.client.request(absent[0], fill_path(path, {}), headers=api.owner)
        allow = {m.strip() for m in r.headers.get("allow", "").split(",") if m.strip()}
        if r.status_code != 405 or not methods <= allow or absent[0] in allow:  # /agents/enroll: GET too
            failures.append((path, absent[0], r.status_code, sorted(methods), sorted(allow)))
    assert failures == []


# ---- the empty policy import --------------------------------------------------------------------


def _draft(api: Api, body: bytes | None, query: str = "") -> Any:
    kw: dict[str, Any] = {"headers": {**api.owner, "content-type": "application/yaml"}}
    if body is not None:
        kw["content"] = body
    return api.req("PUT", "/policy/draft" + query, **kw)


def test_an_empty_import_never_silently_deletes_the_policy(api: Api) -> None:
    api.ok("POST", "/services", 201, json={"name": "web", "ports": ["80/tcp"]})
    for body in (None, b"", b"  \n", b"# nothing\n", b"---\n", b"apiVersion: stockade.io/v1\nkind: LabelKey\n"
                 b"name: tier\n"):
        for query in ("", "?dry_run=true"):
            r = _draft(api, body, query)
            assert r.status_code == 422, (body, query, r.text)
            assert "allow_empty" in r.text
    assert [s["name"] for s in api.ok("GET", "/services")["items"]] == ["web"]
    # confirmed: the dry run shows the removal, the import does it
    dry = _draft(api, b"", "?dry_run=true&allow_empty=true")
    assert dry.status_code == 200 and [c["change"] for c in dry.json()["draft_changes"]] == ["removed"]
    assert _draft(api, b"", "?allow_empty=true").status_code == 200
    assert api.ok("GET", "/services")["items"] == []
    # a draft with no policy objects left: an import of objects works, an empty one must still be confirmed
    assert _draft(api, b"").status_code == 422
