"""Bodies of ``POST /workloads/batch`` (:mod:`stockade.controller.api.workload_batch`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from stockade.controller.api.schemas import NAME_PATTERN

MAX_ITEMS = 1000  # upserts and deletes together in one batch


class WorkloadBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upsert: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_ITEMS,
                                         description="workloads to create or replace (the PUT body)")
    delete: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(default_factory=list, max_length=MAX_ITEMS,
                                                                     description="workloads to delete")


class WorkloadBatchOut(BaseModel):
    created: list[str]
    replaced: list[str]
    deleted: list[str]
