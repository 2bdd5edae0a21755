"""Exponential backoff with jitter, for retrying an unreachable controller.

Delays grow ``initial * factor**n`` up to ``maximum``; each is then scaled by a random
factor in ``[1 - jitter, 1]`` so a fleet that lost the controller together does not
come back in lock-step. ``reset()`` after a success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 0.2
    maximum: float = 5.0
    factor: float = 2.0
    jitter: float = 0.5  # fraction of the delay that is random

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1 or not (0 <= self.jitter <= 1):
            raise ValueError(f"bad backoff policy {self}")


@dataclass
class Backoff:
    policy: BackoffPolicy = field(default_factory=BackoffPolicy)
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        p = self.policy
        ceiling = min(p.maximum, p.initial * p.factor ** min(self.attempts, 64))
        self.attempts += 1
        return ceiling * (1.0 - p.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0
