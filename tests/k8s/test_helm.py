"""The Helm chart (deploy/helm/stockade) renders the same objects as ``stockade k8s manifests``.

One source of truth for what is installed: for several sets of values, ``helm template`` (a real
helm built from Go modules by ``tests/k8s/k8s.sh build install``) and
:func:`stockade.k8s.manifests.manifests` give the same objects, compared object for object after
YAML parsing (keyed by kind and name). Bad values are refused by both, naming the value. ``helm
lint`` passes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from stockade.k8s.manifests import ManifestValues, manifests
from tests.k8s.conftest import SCRIPT

CHART = Path(__file__).parents[2] / "deploy" / "helm" / "stockade"

CASES = {
    "defaults": ManifestValues("https://10.0.0.1:8443", "stockade.local/stockade:1"),
    "lean": ManifestValues("http://127.0.0.1:8080", "stockade.local/stockade:0.1.0", namespace="sec-tools",
                           pull_policy="Never", host_policy=False, node_poll=False, with_ca=False, sync=False,
                           cni_bin_dir="/var/lib/cni-test/bin", create_namespace=False, api_server="127.0.0.1:6443"),
    "v6-api": ManifestValues("https://ctl.example.test", "reg.example.test/stockade@sha256:" + "ab" * 32,
                             pull_policy="Always", api_server="[fd00::1]:6443"),
}


def helm_values(v: ManifestValues) -> dict[str, Any]:
    """The chart's values for ``v`` (deploy/helm/stockade/values.yaml names them)."""
    return {"controller": v.controller, "image": v.image, "imagePullPolicy": v.pull_policy,
            "namespace": v.namespace, "createNamespace": v.create_namespace, "hostPolicy": v.host_policy,
            "nodePoll": v.node_poll, "ca": v.with_ca, "sync": v.sync, "cniBinDir": v.cni_bin_dir,
            "apiServer": v.api_server}


@pytest.fixture(scope="session")
def helm() -> Path:
    path = Path(subprocess.run([str(SCRIPT), "helm-path"], capture_output=True, text=True, check=True).stdout.strip())
    if not path.exists():
        if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
            pytest.skip("Go is needed to build helm once (tests/k8s/k8s.sh build install)")
        subprocess.run([str(SCRIPT), "build", "install"], check=True, timeout=3600)
    return path


def run_helm(helm: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
           "HELM_DATA_HOME": str(tmp / "data")}
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False, env=env, timeout=120)


def template(helm: Path, tmp: Path, values: dict[str, Any], namespace: str = "stockade") -> list[dict[str, Any]]:
    vf = tmp / "values.yaml"
    vf.write_text(yaml.safe_dump(values))
    r = run_helm(helm, tmp, "template", "stockade", str(CHART), "--namespace", namespace, "-f", str(vf))
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(keyed) == len(docs), "two objects of one kind and name"
    return keyed


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_template_equals_stockade_k8s_manifests(helm: Path, tmp_path: Path, case: str) -> None:
    v = CASES[case]
    from_chart = by_key(template(helm, tmp_path, helm_values(v)))
    from_cli = by_key(manifests(v))
    assert sorted(from_chart) == sorted(from_cli)
    for key, obj in from_cli.items():
        assert from_chart[key] == obj, key


def test_the_release_namespace_is_the_default(helm: Path, tmp_path: Path) -> None:
    values = {**helm_values(CASES["defaults"]), "namespace": ""}
    docs = template(helm, tmp_path, values, namespace="kube-stockade")
    assert by_key(docs) == by_key(manifests(ManifestValues("https://10.0.0.1:8443", "stockade.local/stockade:1",
                                                           namespace="kube-stockade")))


@pytest.mark.parametrize(("value", "bad"), [("controller", "ftp://x"), ("controller", ""), ("image", "a b"),
                                            ("imagePullPolicy", "Sometimes"), ("namespace", "Not_A_Name"),
                                            ("cniBinDir", "relative/bin"), ("apiServer", "no-port")])
def test_bad_values_are_refused_by_both_naming_the_value(helm: Path, tmp_path: Path, value: str, bad: str) -> None:
    field = {"imagePullPolicy": "pull_policy", "cniBinDir": "cni_bin_dir", "apiServer": "api_server"}.get(value, value)
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump({**helm_values(CASES["defaults"]), value: bad}))
    r = run_helm(helm, tmp_path, "template", "stockade", str(CHART), "-f", str(vf))
    assert r.returncode != 0 and f"{field}:" in r.stderr, r.stderr
    kw = {"controller": "https://10.0.0.1:8443", "image": "i", **{field: bad}}
    with pytest.raises(ValueError, match=f"^{field}:"):
        ManifestValues(**kw)  # type: ignore[arg-type]


def test_helm_lint(helm: Path, tmp_path: Path) -> None:
    vf = tmp_path / "values.yaml"
    vf.write_text(yaml.safe_dump(helm_values(CASES["defaults"])))
    r = run_helm(helm, tmp_path, "lint", str(CHART), "-f", str(vf))
    assert r.returncode == 0, r.stdout + r.stderr
