"""Request and response bodies of :mod:`stockade.controller.api.objects`."""

from __future__ import annotations

from pydantic import BaseModel

from stockade.model.workloads import EnforcementMode


class ModeIn(BaseModel):
    mode: EnforcementMode
