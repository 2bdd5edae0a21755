"""The REST API's request and response bodies per route module (Pydantic wire shapes only).

Shared shapes (selectors, objects, errors) are in :mod:`stockade.controller.api.schemas`; routes import
their bodies from here so the route modules hold routes only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A request body: unknown fields are refused (422), never ignored."""

    model_config = ConfigDict(extra="forbid")
