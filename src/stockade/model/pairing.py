"""Pairing profiles: what an enrolled host becomes, and how far its activation codes reach.

A pairing profile presets the labels and the enforcement mode of every workload its activation
codes create (labels decide which policy a host gets, so they come from the profile, never from
the host), and bounds enrolment: an expiry, a total number of uses, an on/off switch, and what
one code may allow (``code_max_uses`` enrolments, ``code_ttl_seconds`` of life; a code may ask
for less, never more). The use counter is not part of the profile: enrolment counts it
(:mod:`stockade.controller.services.enrolment`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from stockade.model.labels import Label
from stockade.model.workloads import EnforcementMode

DEFAULT_CODE_TTL = 86400  # a code lives one day unless its profile says otherwise
MIN_CODE_TTL = 60
MAX_CODE_TTL = 365 * 86400
MAX_USES = 1_000_000


@dataclass(frozen=True)
class PairingProfile:
    name: str
    labels: tuple[Label, ...] = ()  # sorted, one value per key
    mode: EnforcementMode = EnforcementMode.VISIBILITY
    expires_at: dt.datetime | None = None  # UTC
    max_uses: int | None = None  # enrolments through all its codes together
    enabled: bool = True
    description: str = ""
    code_max_uses: int = 1  # enrolments one code allows
    code_ttl_seconds: int = DEFAULT_CODE_TTL  # lifetime of a new code

    def label_map(self) -> dict[str, str]:
        return {lab.key: lab.value for lab in self.labels}

    def expired(self, now: dt.datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now
