"""The Stockade REST API as the cluster sync uses it: the ``k8s.*`` workloads and the label keys.

An API key (``Authorization: Bearer stk_...``) with the admin role authenticates every call; the
controller authorises and audits them like any other client's. The sync never reaches into the
controller's storage.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx

from stockade.errors import StockadeError
from stockade.model.labels import LabelKey


class ControllerApiError(StockadeError):
    """The controller refused or failed a call (status and body are in the message)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ControllerClient:
    def __init__(self, base_url: str, api_key: str, ca_cert: Path | None = None, timeout: float = 10.0) -> None:
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else True
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/api/v1",
            headers={"Authorization": f"Bearer {api_key}"},
            verify=verify,
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _pages(self, path: str, **params: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            q = {**params, "limit": "500", **({"cursor": cursor} if cursor else {})}
            r = await self._http.get(path, params=q)
            self._check(r, f"GET {path}")
            page = r.json()
            out.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    async def label_keys(self) -> dict[str, LabelKey]:
        items = await self._pages("/label-keys")
        return {i["body"]["name"]: LabelKey(i["body"]["name"], frozenset(i["body"].get("values", ()))) for i in items}

    async def owned_workloads(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Bodies of the workloads whose name starts with ``prefix`` (the API filters by substring)."""
        items = await self._pages("/workloads", name=prefix)
        return {i["name"]: i["body"] for i in items if i["name"].startswith(prefix)}

    async def put_workload(self, body: dict[str, Any]) -> None:
        name = body["name"]
        r = await self._http.put(f"/workloads/{name}", json=body)
        if r.status_code == 404:
            r = await self._http.post("/workloads", json=body)
        self._check(r, f"write workload {name}")

    async def batch_workloads(self, upsert: list[dict[str, Any]], delete: list[str]) -> None:
        """Every write in ONE transaction (``POST /workloads/batch``); any refusal writes nothing."""
        r = await self._http.post("/workloads/batch", json={"upsert": upsert, "delete": delete})
        self._check(r, f"batch of {len(upsert)} workload writes and {len(delete)} deletes")

    async def delete_workload(self, name: str) -> None:
        r = await self._http.delete(f"/workloads/{name}")
        if r.status_code != 404:
            self._check(r, f"DELETE workload {name}")

    async def network_policies(self) -> dict[str, dict[str, Any]]:
        """Bodies of the stored NetworkPolicies (the sync owns them all)."""
        return {i["name"]: i["body"] for i in await self._pages("/network-policies")}

    async def put_network_policy(self, body: dict[str, Any]) -> None:
        name = body["name"]
        r = await self._http.put(f"/network-policies/{name}", json=body)
        if r.status_code == 404:
            r = await self._http.post("/network-policies", json=body)
        self._check(r, f"write network policy {name}")

    async def delete_network_policy(self, name: str) -> None:
        r = await self._http.delete(f"/network-policies/{name}")
        if r.status_code != 404:
            self._check(r, f"DELETE network policy {name}")

    @staticmethod
    def _check(r: httpx.Response, what: str) -> None:
        if r.status_code >= 400:
            raise ControllerApiError(f"{what}: HTTP {r.status_code} {r.text[:500]}", r.status_code)
