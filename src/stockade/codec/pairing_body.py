"""The stored body of a pairing profile (kind ``pairing_profile``), both ways.

Pairing profiles are no policy document (a policy file never holds one): they are written through
the REST API only, and stored like every other object kind (``objects`` table, revision, ETag,
audit). Body (canonical: sorted labels, explicit defaults, the expiry in UTC)::

    {"name": "web", "labels": {"app": "shop", "env": "prod"}, "mode": "visibility",
     "expires_at": "2027-01-01T00:00:00+00:00", "max_uses": null, "enabled": true,
     "description": "", "code_max_uses": 1, "code_ttl_seconds": 86400}

``decode`` checks every field and reports each problem with its path (unknown fields too); a
naive expiry is read as UTC.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from stockade.errors import Issue, ValidationError
from stockade.model.labels import Label, is_valid_name
from stockade.model.pairing import DEFAULT_CODE_TTL, MAX_CODE_TTL, MAX_USES, MIN_CODE_TTL, PairingProfile
from stockade.model.workloads import EnforcementMode

MAX_LABELS = 64
MAX_DESCRIPTION = 1024
POD_IDENTITY_PROFILE = "k8s-node"
"""The profile name recorded on pod identities (controller/services/pod_enrolment.py): no real profile may take it."""
RESERVED_NAMES = frozenset({POD_IDENTITY_PROFILE})
FIELDS = ("name", "labels", "mode", "expires_at", "max_uses", "enabled", "description", "code_max_uses",
          "code_ttl_seconds")


def as_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def encode(p: PairingProfile) -> dict[str, Any]:
    return {
        "name": p.name,
        "labels": p.label_map(),
        "mode": p.mode.value,
        "expires_at": p.expires_at.isoformat() if p.expires_at else None,
        "max_uses": p.max_uses,
        "enabled": p.enabled,
        "description": p.description,
        "code_max_uses": p.code_max_uses,
        "code_ttl_seconds": p.code_ttl_seconds,
    }


def _int(issues: list[Issue], source: str, data: Mapping[str, Any], key: str, default: int | None, low: int,
         high: int) -> int | None:
    value = data.get(key, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        issues.append(Issue(source, 0, key, f"must be an integer {low}-{high}"))
        return default
    return value


def _expiry(issues: list[Issue], source: str, value: Any) -> dt.datetime | None:
    if value is None:
        return None
    try:
        if isinstance(value, dt.datetime):
            return as_utc(value)
        if isinstance(value, str) and len(value) <= 64:
            return as_utc(dt.datetime.fromisoformat(value))
    except (ValueError, OverflowError):  # not a date, or beyond year 9999 once in UTC
        pass
    issues.append(Issue(source, 0, "expires_at", "must be an ISO 8601 date and time (in years 1-9999 UTC), or null"))
    return None


def decode(data: Any, source: str = "api") -> PairingProfile:
    """The pairing profile of a body; ValidationError with every issue otherwise."""
    if not isinstance(data, Mapping):
        raise ValidationError([Issue(source, 0, "", "the body must be an object")])
    issues = [Issue(source, 0, str(key), "unknown field") for key in sorted(set(data) - set(FIELDS), key=str)]
    name = data.get("name")
    if not isinstance(name, str) or not is_valid_name(name):
        issues.append(Issue(source, 0, "name", "must be a name: 1-63 of A-Z a-z 0-9 _ . -, not starting with a symbol"))
    elif name in RESERVED_NAMES:
        issues.append(Issue(source, 0, "name", f"{name!r} is reserved: it marks the pod identities node agents enrol"))
    raw_labels = data.get("labels", {})
    labels: list[Label] = []
    if not isinstance(raw_labels, Mapping) or len(raw_labels) > MAX_LABELS:
        issues.append(Issue(source, 0, "labels", f"must be an object of at most {MAX_LABELS} key: value names"))
    else:
        for key, value in sorted(raw_labels.items(), key=lambda kv: str(kv[0])):
            if not isinstance(key, str) or not is_valid_name(key):
                issues.append(Issue(source, 0, f"labels.{key}", "the key must be a name"))
            elif not isinstance(value, str) or not is_valid_name(value):
                issues.append(Issue(source, 0, f"labels.{key}", "the value must be a name"))
            else:
                labels.append(Label(key, value))
    modes = {m.value: m for m in EnforcementMode}
    mode = modes.get(data.get("mode", EnforcementMode.VISIBILITY.value))
    if mode is None:
        issues.append(Issue(source, 0, "mode", f"must be one of {', '.join(modes)}"))
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        issues.append(Issue(source, 0, "enabled", "must be true or false"))
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        issues.append(Issue(source, 0, "description", f"must be a text of at most {MAX_DESCRIPTION} characters"))
    expires_at = _expiry(issues, source, data.get("expires_at"))
    max_uses = _int(issues, source, data, "max_uses", None, 1, MAX_USES)
    code_max_uses = _int(issues, source, data, "code_max_uses", 1, 1, MAX_USES)
    code_ttl = _int(issues, source, data, "code_ttl_seconds", DEFAULT_CODE_TTL, MIN_CODE_TTL, MAX_CODE_TTL)
    if issues:
        raise ValidationError(issues)
    assert isinstance(name, str) and mode is not None and code_max_uses is not None and code_ttl is not None
    return PairingProfile(name, tuple(labels), mode, expires_at, max_uses, bool(enabled), str(description),
                          code_max_uses, code_ttl)
