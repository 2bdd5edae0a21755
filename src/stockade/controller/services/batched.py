"""Callbacks queued for :meth:`.distribution.PolicyDistributor.transact_batched`, and how one batch
of them runs: together in one transaction, or, if any of them raises, each alone (so one refused
caller gets its own error and never takes the others down with it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from stockade.controller.services.compiler_txn import CompilerTxn

T = TypeVar("T")
BATCH_LIMIT = 64  # callbacks of transact_batched run in one transaction at most


@dataclass
class Queued(Generic[T]):
    """One :meth:`~.distribution.PolicyDistributor.transact_batched` callback and what became of it."""

    fn: Callable[[Session, CompilerTxn], T]
    result: T | None = None
    error: Exception | None = None
    done: bool = False


def run_batch(transact: Callable[[Callable[[Session, CompilerTxn], Any]], Any], batch: list[Queued[Any]]) -> None:
    """Run ``batch`` through ``transact`` (the caller holds the distributor's lock): in one
    transaction, else each callback alone; every item is done afterwards."""
    try:
        if len(batch) > 1:
            try:
                results = transact(lambda db, txn: [it.fn(db, txn) for it in batch])
            except Exception:  # each callback is retried alone below
                pass
            else:
                for it, result in zip(batch, results, strict=True):
                    it.result = result
                return
        for it in batch:
            try:
                it.result = transact(it.fn)
            except Exception as exc:  # handed to the caller that queued it
                it.error = exc
    finally:
        for it in batch:
            it.done = True
