"""The console is served by the controller at ``/``: security headers, API paths untouched.

No browser needed: the real app through Starlette's test client.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from stockade.controller.api.web_mount import WEB_DIR
from stockade.controller.app import create_app
from stockade.controller.context import ControllerSettings
from stockade.controller.services.auth import Argon2Params


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data = tmp_path_factory.mktemp("mount")
    settings = ControllerSettings(database_url=f"sqlite:///{data / 'c.db'}", secure_cookies=False,
                                  argon2=Argon2Params(time_cost=1, memory_kib=8192, parallelism=1))
    app = create_app(settings)

    @app.get("/api/v1/added-later")
    def added_later() -> dict[str, str]:  # a route registered after the console: it still wins
        return {"ok": "yes"}

    with TestClient(app) as c:
        yield c


def test_index_with_strict_content_security_policy(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="js/main.js">' in r.text


def test_every_module_and_stylesheet_is_served(client: TestClient) -> None:
    files = [p for p in WEB_DIR.rglob("*") if p.suffix in (".js", ".css")]
    assert len(files) > 10
    for p in files:
        r = client.get("/" + p.relative_to(WEB_DIR).as_posix())
        assert r.status_code == 200, p
        want = "javascript" if p.suffix == ".js" else "text/css"
        assert want in r.headers["content-type"], (p, r.headers["content-type"])
        assert r.headers["cache-control"] == "no-cache"


def test_no_external_resources(client: TestClient) -> None:
    """Offline by construction: nothing is fetched from another origin (no CDN)."""
    for p in [*WEB_DIR.rglob("*.js"), *WEB_DIR.rglob("*.css"), *WEB_DIR.rglob("*.html")]:
        text = p.read_text()
        for bad in ("http://", "https://", "//cdn", "@import url("):
            if bad == "http://" and "http://www.w3.org/2000/svg" in text:
                text = text.replace("http://www.w3.org/2000/svg", "")
            assert bad not in text, f"{p.relative_to(WEB_DIR)} refers to {bad}"


def test_api_paths_keep_the_api_answers(client: TestClient) -> None:
    r = client.get("/api/v1/no-such-thing")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert client.get("/api/v1/openapi.json").status_code == 200
    assert client.get("/api/v1/added-later").json() == {"ok": "yes"}
    assert client.get("/api/v1/auth/whoami").status_code == 401
    api_csp = client.get("/api/v1/openapi.json").headers["content-security-policy"]  # the API's own, not the console's
    assert "default-src 'none'" in api_csp and "script-src" not in api_csp


def test_unknown_files_and_traversal(client: TestClient) -> None:
    assert client.get("/no-such-file.js").status_code == 404
    assert client.get("/../pyproject.toml").status_code == 404
    assert client.get("/js/../../controller/app.py").status_code == 404
    assert not (Path(WEB_DIR) / "node_modules").exists()
