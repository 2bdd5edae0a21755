"""Names and strings of the iptables+ipset backend: chain prefix, ipset names (ipset's 31
characters), NFLOG prefixes (xt_NFLOG's 63) and strings quoted as ``iptables-save`` prints them.

Pure; shared by the renderer and the backend (re-exported by :mod:`.render`).
"""

from __future__ import annotations

import hashlib
import re

from stockade.backends import flowlog
from stockade.backends.common import checked_rule_id
from stockade.backends.flowlog import FlowAction
from stockade.backends.iptables.model import IPSET_NAME_MAX, TEMP_SUFFIX
from stockade.errors import RenderError
from stockade.model.addresses import Family

NFLOG_PREFIX_MAX = 63  # xt_NFLOG keeps 64 bytes including the terminating NUL
LOCAL_SET = "local"

_PREFIX_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,11}$")
_PEER_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_UNQUOTED = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")



def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise RenderError(f"invalid iptables chain prefix {prefix!r} (want [A-Za-z][A-Za-z0-9_]{{0,11}})")
    return prefix


def ipset_name(prefix: str, peer: str, family: Family) -> str:
    """``<prefix>-<peer>-v4``; a peer too long for ipset's 31 characters becomes ``h<sha256[:12]>``.

    Room is kept for the temporary suffix, so ``<name>-t`` fits too.
    """
    if not _PEER_RE.match(peer) or peer == LOCAL_SET:
        raise RenderError(f"address set name {peer!r} is not a valid ipset name part")
    name = f"{prefix}-{peer}-v{family.value}"
    if len(name) + len(TEMP_SUFFIX) > IPSET_NAME_MAX:
        short = "h" + hashlib.sha256(peer.encode()).hexdigest()[:12]
        name = f"{prefix}-{short}-v{family.value}"
    if len(name) + len(TEMP_SUFFIX) > IPSET_NAME_MAX:
        raise RenderError(f"ipset name {name!r} is longer than {IPSET_NAME_MAX - len(TEMP_SUFFIX)} characters")
    return name


def local_set_name(prefix: str, family: Family) -> str:
    return f"{prefix}-{LOCAL_SET}-v{family.value}"


def save_string(value: str) -> str:
    """A string argument as ``iptables-save`` prints it: bare when [A-Za-z0-9_-]+, else quoted."""
    if value and all(c in _UNQUOTED for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'


def comment_id(rule_id: str) -> str:
    return checked_rule_id(rule_id, "embedded in an iptables comment")


def log_prefix(rule_id: str, action: FlowAction = FlowAction.WOULD_BLOCK) -> str:
    """NFLOG prefix of a verdict: ``stk:pb:<rule id>`` (would-be drop), ``stk:a:``, ``stk:d:``.

    xt_NFLOG keeps at most 63 characters; a longer rule id keeps its first characters and
    ends with ``~`` and 8 hex digits of its SHA-256, so distinct rules keep distinct prefixes.
    """
    text = flowlog.log_prefix(action, comment_id(rule_id))
    if len(text) <= NFLOG_PREFIX_MAX:
        return text
    digest = hashlib.sha256(rule_id.encode()).hexdigest()[:8]
    return text[: NFLOG_PREFIX_MAX - 9] + "~" + digest
