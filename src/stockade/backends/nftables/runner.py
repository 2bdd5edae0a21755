"""Running the ``nft`` binary (optionally inside a network namespace) and reading its listings.

Every command is an argv list (never a shell); with ``netns`` it becomes
``ip netns exec <netns> nft ...``. Listings are parsed here into plain values the
backend compares: chain headers and rule lines (counters normalised) from the text
listing, set members (as merged address ranges) from the JSON listing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stockade.backends.common import CommandResult, run_command, validate_netns
from stockade.backends.nftables.lookup import MapElement
from stockade.errors import ApplyError, BackendError
from stockade.model.addresses import AddressRanges, IPNetwork

_COUNTER_RE = re.compile(r"counter packets \d+ bytes \d+")
NFT_TIMEOUT_S = 120.0


def normalise_counters(text: str) -> str:
    """Zero every ``counter packets N bytes M`` so listings taken at different times compare equal."""
    return _COUNTER_RE.sub("counter packets 0 bytes 0", text)


def without_elements(listing: str, sets: tuple[str, ...]) -> str:
    """``listing`` without the elements of ``sets`` (dynamic sets the datapath fills itself, whose
    contents and timers change with traffic and are not tampering)."""
    out: list[str] = []
    inside = skipping = False
    for line in listing.splitlines(keepends=True):
        text = line.strip()
        if not inside:
            inside = text.startswith("set ") and text.endswith(" {") and text[4:-2] in sets
        elif skipping or text.startswith("elements = {"):
            skipping = not text.endswith("}")
            continue
        elif text == "}":
            inside = False
        out.append(line)
    return "".join(out)


@dataclass(frozen=True)
class ChainListing:
    """One chain as listed: its base-chain header ("" for a regular chain) and rule lines."""

    name: str
    header: str
    rules: tuple[str, ...]


class NftRunner:
    """Runs ``nft`` in one network namespace (None: the current one)."""

    def __init__(self, netns: str | None = None, nft: str = "nft") -> None:
        self.netns = validate_netns(netns)
        self.nft = nft

    def argv(self, *args: str) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, self.nft, *args]

    def run(self, args: Sequence[str], check: bool = True) -> CommandResult:
        proc = run_command(self.argv(*args), NFT_TIMEOUT_S, what="nft")  # argv list, validated names
        if check and proc.returncode != 0:
            raise BackendError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def load(self, text: str, check_only: bool = False) -> None:
        """``nft -f`` a file holding ``text`` (one transaction); ApplyError with nft's message."""
        fd, path = tempfile.mkstemp(prefix="stockade-", suffix=".nft")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            args = ["-c", "-f", path] if check_only else ["-f", path]
            try:
                proc = self.run(args, check=False)
            except BackendError as exc:
                raise ApplyError(str(exc)) from exc
            if proc.returncode != 0:
                raise ApplyError(f"nft refused the ruleset (nothing changed): {proc.stderr.strip()}")
        finally:
            os.unlink(path)

    def list_table(self, table: str, terse: bool = False) -> str | None:
        """``nft list table inet <table>`` text, or None when the table does not exist."""
        args = ["-t", "list", "table", "inet", table] if terse else ["list", "table", "inet", table]
        proc = self.run(args, check=False)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise BackendError(f"nft list table inet {table} failed: {proc.stderr.strip()}")
        return proc.stdout

    def list_table_json(self, table: str) -> list[dict[str, Any]] | None:
        """The JSON objects of ``nft -j list table inet <table>``, or None when absent."""
        proc = self.run(["-j", "list", "table", "inet", table], check=False)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise BackendError(f"nft -j list table inet {table} failed: {proc.stderr.strip()}")
        items: list[dict[str, Any]] = json.loads(proc.stdout)["nftables"]
        return items

    def list_ruleset(self) -> str:
        return self.run(["list", "ruleset"]).stdout

    def table_exists(self, table: str) -> bool:
        return self.list_table(table, terse=True) is not None


def parse_chains(listing: str) -> tuple[ChainListing, ...]:
    """Chains of an ``nft list table`` text listing, counters normalised."""
    chains: list[ChainListing] = []
    name: str | None = None
    header = ""
    rules: list[str] = []
    for raw in listing.splitlines():
        line = raw.strip()
        if name is None:
            m = re.match(r"^chain (\S+) \{$", line)
            if m:
                name, header, rules = m.group(1), "", []
            continue
        if line == "}":
            chains.append(ChainListing(name, header, tuple(rules)))
            name = None
        elif line.startswith("type ") and not rules and not header:
            header = line
        elif line:
            rules.append(normalise_counters(line))
    return tuple(chains)


def _element_ranges(elem: Any) -> list[IPNetwork | tuple[str, str]]:
    if isinstance(elem, str):
        return [ipaddress.ip_network(elem)]
    if isinstance(elem, dict) and "prefix" in elem:
        p = elem["prefix"]
        return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = elem["range"]
        return [(str(lo), str(hi))]
    if isinstance(elem, dict) and "elem" in elem:  # element with options (timeout, comment...)
        return _element_ranges(elem["elem"]["val"])
    raise BackendError(f"unexpected set element in nft JSON: {elem!r}")


def set_members(items: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> dict[str, AddressRanges]:
    """Every set of a JSON table listing but ``skip``, by name, as merged address ranges."""
    out: dict[str, AddressRanges] = {}
    for item in items:
        s = item.get("set")
        if s is None or s.get("name") in skip:
            continue
        nets: list[IPNetwork] = []
        extra: list[IPNetwork] = []
        for elem in s.get("elem", []):
            for part in _element_ranges(elem):
                if isinstance(part, tuple):
                    lo, hi = ipaddress.ip_address(part[0]), ipaddress.ip_address(part[1])
                    extra.extend(ipaddress.summarize_address_range(lo, hi))
                else:
                    nets.append(part)
        out[s["name"]] = AddressRanges.of([*nets, *extra])
    return out


_PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}


def _bounds(value: Any) -> tuple[int, int]:
    """(first, last) of one concatenation field in nft JSON: a value, a prefix or a range."""
    if isinstance(value, dict) and "prefix" in value:
        net = ipaddress.ip_network(f"{value['prefix']['addr']}/{value['prefix']['len']}")
        return int(net.network_address), int(net.broadcast_address)
    if isinstance(value, dict) and "range" in value:
        lo, hi = value["range"]
        return _bounds(lo)[0], _bounds(hi)[1]
    if isinstance(value, int):
        return value, value
    if isinstance(value, str) and value in _PROTO_NUMBERS:
        return _PROTO_NUMBERS[value], _PROTO_NUMBERS[value]
    if isinstance(value, str) and value.isdigit():
        return int(value), int(value)
    if isinstance(value, str):
        addr = int(ipaddress.ip_address(value))
        return addr, addr
    raise BackendError(f"unexpected map key field in nft JSON: {value!r}")


def map_elements(items: list[dict[str, Any]]) -> dict[str, set[MapElement]]:
    """Every dispatch map of a JSON table listing, by name, as :class:`MapElement` s."""
    out: dict[str, set[MapElement]] = {}
    for item in items:
        m = item.get("map")
        if m is None:
            continue
        elems: set[MapElement] = set()
        for key, verdict in m.get("elem", []):
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"]["val"]
            fields = key.get("concat") if isinstance(key, dict) else None
            if not fields or len(fields) != 2 or not isinstance(verdict, dict) or len(verdict) != 1:
                raise BackendError(f"unexpected map element in nft JSON: {key!r}: {verdict!r}")
            ((kind, target),) = verdict.items()
            (proto, _), (plo, phi) = (_bounds(f) for f in fields)
            chain = str(target["target"]) if kind == "jump" else f"{kind}:{target}"
            elems.add(MapElement(proto, plo, phi, chain))
        out[m["name"]] = elems
    return out


def set_flags(items: list[dict[str, Any]]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """(type, flags) of every set of a JSON table listing, by name."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for item in items:
        s = item.get("set")
        if s is not None:
            out[s["name"]] = (str(s.get("type")), tuple(sorted(s.get("flags", []))))
    return out
