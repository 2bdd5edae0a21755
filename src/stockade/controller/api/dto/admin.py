"""Request and response bodies of :mod:`stockade.controller.api.admin`."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from pydantic import BaseModel, Field

from stockade.controller.api.dto import Strict
from stockade.controller.api.schemas import MAX_LABELS, NAME_PATTERN
from stockade.controller.services.auth import Role

ScopeLabel = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}=[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")]


class LoginIn(Strict):
    username: Annotated[str, Field(min_length=1, max_length=64)]
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class WhoAmI(BaseModel):
    name: str
    kind: str
    role: str | None
    scope: list[str]


class UserIn(Strict):
    username: Annotated[str, Field(pattern=NAME_PATTERN)]
    password: Annotated[str, Field(min_length=12, max_length=1024)]
    role: Role
    scope: list[ScopeLabel] = Field(default_factory=list, max_length=MAX_LABELS, description="labels (ruleset-manager)")


class UserUpdate(Strict):
    password: Annotated[str, Field(min_length=12, max_length=1024)] | None = None
    role: Role | None = None
    scope: Annotated[list[ScopeLabel], Field(max_length=MAX_LABELS)] | None = None
    disabled: bool | None = None


class UserOut(BaseModel):
    username: str
    role: str
    scope: list[str]
    disabled: bool
    created_at: dt.datetime
    revision: int
    etag: str


class ApiKeyIn(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    role: Role
    scope: list[ScopeLabel] = Field(default_factory=list, max_length=MAX_LABELS)


class ApiKeyOut(BaseModel):
    id: str
    name: str
    owner: str
    role: str
    scope: list[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None
    key: str | None = Field(None, description="the secret, present only in the creation answer")
