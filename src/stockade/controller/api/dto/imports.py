"""Bodies of ``POST /policy/draft/import`` (:mod:`stockade.controller.api.imports`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from stockade.controller.api.dto import Strict
from stockade.controller.api.schemas import ChangeOut


class ImportFile(Strict):
    name: str = Field(min_length=1, max_length=255)
    content: str = Field(max_length=4 * 1024 * 1024)


class ImportIn(Strict):
    kind: str = Field(min_length=1, max_length=32, description="iptables, nftables, windows, illumio")
    files: list[ImportFile] = Field(min_length=1, max_length=64)
    host: str | None = Field(default=None, max_length=63)
    addresses: dict[str, Annotated[str, Field(max_length=2000)]] = Field(
        default_factory=dict, max_length=1024, description="host -> its own addresses, comma-separated")
    backend: str | None = Field(default=None, max_length=32)
    dry_run: bool = False


class ImportOut(BaseModel):
    report: dict[str, Any]
    draft_changes: list[ChangeOut]
    inventory_changes: list[ChangeOut]
