"""Importers never crash on hostile input: any text or JSON gives a result (bad parts reported) or
a ValidationError, never another exception (which the API would answer as a 500)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from stockade.errors import ValidationError
from stockade.importers import ImportOptions, Source, run_import
from stockade.policyfile import dump_policy, load_documents

json_values: Any = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(
        ["tcp", "udp", "icmp", "Any", "Allow", "Block", "Inbound", "Outbound", "10.0.0.1", "10.0.0.0/8", "::/0",
         "@s", "accept", "drop", "input", "filter", "inet", "ip", "saddr", "dport", "href", "/orgs/1/labels/1",
         "1-2", "a-b", "LocalSubnet", "8:0", "established"]) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["nftables", "chain", "rule", "set", "family", "table", "name", "hook", "type", "policy",
                         "expr", "match", "left", "right", "op", "payload", "protocol", "field", "meta", "key",
                         "elem", "prefix", "addr", "len", "range", "vmap", "data", "jump", "target", "Rules",
                         "Profiles", "Direction", "Action", "Protocol", "LocalPort", "RemoteAddress", "labels",
                         "value", "href", "rule_sets", "rules", "providers", "consumers", "label", "ip_lists",
                         "ip_ranges", "from_ip", "services", "service_ports", "port", "proto", "scopes",
                         "workloads", "interfaces", "address"]), children, max_size=5),
    max_leaves=25)

IPT_WORDS = ["-A", "INPUT", "OUTPUT", "X", "-s", "-d", "!", "-p", "tcp", "udp", "icmp", "-m", "multiport", "set",
             "--match-set", "s", "src", "--dport", "--dports", "80", "1:2", "65536", "-j", "ACCEPT", "DROP", "RETURN",
             "-g", "LOG", "--icmp-type", "8", "10.0.0.1", "10.0.0.0/8", "::1", "--ctstate", "NEW", "conntrack",
             "\"", "'", ":INPUT", "DROP", "*filter", "COMMIT", "create", "add", "hash:ip"]


def _check(kind: str, text: str) -> None:
    try:
        result = run_import(kind, [Source("f", text)], ImportOptions())
    except ValidationError:
        return
    load_documents(dump_policy(result.policy), "x")  # whatever came through is valid policy


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["nftables", "windows", "illumio"]), json_values)
def test_json_importers_survive_anything(kind: str, doc: Any) -> None:
    if kind == "nftables" and isinstance(doc, dict):
        doc = {"nftables": [doc, *doc.get("nftables", [])] if isinstance(doc.get("nftables"), list) else [doc]}
    _check(kind, json.dumps(doc))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(IPT_WORDS), max_size=10).map(" ".join), max_size=12))
def test_iptables_importer_survives_anything(lines: list[str]) -> None:
    _check("iptables", "\n".join(["*filter", ":INPUT DROP [0:0]", ":X - [0:0]", *lines, "COMMIT"]))
    _check("iptables", "\n".join(lines))
