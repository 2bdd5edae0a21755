"""Who is really talking to the controller: forwarded headers, trusted only from configured proxies.

A reverse proxy in front of the controller reports the client's address in ``X-Forwarded-For``
and the scheme and host the client used in ``X-Forwarded-Proto`` / ``X-Forwarded-Host``. Anyone
can send those headers, so they count only when the *direct peer* (the TCP connection's source)
lies in :attr:`ControllerSettings.trusted_proxies <stockade.controller.context.ControllerSettings>`;
otherwise the peer's own address and the request's own scheme and ``Host`` are used. The
controller's HTTP server must not rewrite the peer address itself (``stockade controller`` runs
uvicorn with ``proxy_headers=False``), or a spoofed header would reach us as the peer.

The client address feeds the login rate limit and the audit trail; the scheme and host feed the
CSRF origin check (:mod:`stockade.controller.csrf`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from stockade.errors import Issue, ValidationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str], field: str = "trusted_proxies") -> tuple[Network, ...]:
    """``"10.0.0.5"``, ``"10.0.0.0/8"``, ``"::1"`` ... as networks; every bad entry named."""
    out: list[Network] = []
    issues: list[Issue] = []
    for i, text in enumerate(entries):
        try:
            out.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError:
            issues.append(Issue("settings", 0, f"{field}[{i}]", f"{text!r} is not an IP address or CIDR"))
    if issues:
        raise ValidationError(issues)
    return tuple(out)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.partition(":")[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _first(value: str | None) -> str | None:
    if not value:
        return None
    first = value.split(",")[0].strip()
    return first or None


@dataclass(frozen=True)
class TrustedProxies:
    """The proxies whose forwarded headers are believed (none by default)."""

    networks: tuple[Network, ...] = ()

    @staticmethod
    def parse(entries: Iterable[str]) -> TrustedProxies:
        return TrustedProxies(parse_networks(entries))

    def trusts(self, peer: str | None) -> bool:
        if not peer or not self.networks:
            return False
        addr = _ip(peer)
        return addr is not None and any(addr in net for net in self.networks)

    def client_host(self, peer: str | None, headers: Mapping[str, str]) -> str:
        """The client's address: the peer, or the nearest untrusted hop of ``X-Forwarded-For``.

        The list is read right to left (each proxy appends the address it saw), skipping our own
        trusted proxies; the first address that is not one of them is the client. Entries left of
        it were written by the client and are ignored.
        """
        fallback = peer or "unknown"
        if not self.trusts(peer):
            return fallback
        forwarded = headers.get("x-forwarded-for", "")
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        if not hops:
            return fallback
        for hop in reversed(hops):
            addr = _ip(hop)
            if addr is None:
                return fallback  # a trusted proxy never writes this: do not let the client name itself
            if not self.trusts(str(addr)):
                return str(addr)
        return str(_ip(hops[0]))

    def scheme_and_host(self, peer: str | None, scheme: str, headers: Mapping[str, str]) -> tuple[str, str]:
        """The scheme and ``Host`` the client used (forwarded ones only from a trusted proxy)."""
        host = headers.get("host", "")
        if self.trusts(peer):
            scheme = _first(headers.get("x-forwarded-proto")) or scheme
            host = _first(headers.get("x-forwarded-host")) or host
        return scheme.lower(), host
