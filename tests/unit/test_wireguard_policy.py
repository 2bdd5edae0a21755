"""``encrypt: true`` in the model, codec, evaluator, compiler and capability check (no kernel).

* codec: YAML and REST bodies carry ``encrypt`` on rules and rulesets; an IP list in an
  encrypted rule is refused naming the field;
* evaluator: an encrypted allow wins over a plain one, ``explain`` says "encrypted by ruleset X
  rule N", a peer that cannot run WireGuard (idle, no key) makes the requiring side block;
* compiler: the WireGuard peers of every host are exactly the other side of its encrypted rules,
  incremental == full recompile with keys churning, and a peer change is a delta for that host;
* backends without WireGuard fail closed.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.backends.base import Capability, check_capabilities
from stockade.backends.f5.backend import F5_CAPABILITIES
from stockade.backends.ipfilter.backend import IPFILTER_CAPABILITIES
from stockade.backends.iptables.backend import IPTABLES_CAPABILITIES
from stockade.backends.iptables.render import render_iptables
from stockade.backends.nftables.backend import NFTABLES_CAPABILITIES
from stockade.backends.nftables.render import render_nftables
from stockade.backends.windows.backend import WINDOWS_CAPABILITIES
from stockade.cli.policy_cmds import describe
from stockade.codec.bodies import ruleset_body
from stockade.compiler import Compiler
from stockade.compiler.delta import (
    HostHistory,
    UpdateKind,
    apply_update,
    policy_update_from_dict,
    policy_update_to_dict,
)
from stockade.compiler.ir import host_policy_from_json, host_policy_to_json
from stockade.compiler.single import compile_host
from stockade.errors import RenderError, UnsupportedFeatureError, ValidationError
from stockade.evaluator import Evaluator, Verdict
from stockade.model import IPListSelector, Policy, Workload
from stockade.model.rules import Ruleset
from stockade.model.services import Proto
from stockade.model.workloads import EnforcementMode, WireGuardIdentity, validate_public_key
from stockade.policyfile import dump_policy, load_documents
from tests.unit import policy_strategies as ps

PROFILE = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def key_of(name: str) -> str:
    return base64.b64encode(hashlib.sha256(name.encode()).digest()).decode()


YAML = """
apiVersion: stockade.io/v1
kind: Service
name: pg
ports: [5432/tcp]
---
apiVersion: stockade.io/v1
kind: Service
name: http
ports: [80/tcp]
---
apiVersion: stockade.io/v1
kind: Ruleset
name: shop
scope: all
rules:
  - consumers: [{labels: {role: web}}]
    providers: [{labels: {role: db}}]
    services: [http]
  - consumers: [{labels: {role: web}}]
    providers: [{labels: {role: db}}]
    services: [pg, http]
    encrypt: true
---
apiVersion: stockade.io/v1
kind: Ruleset
name: vault
scope: all
encrypt: true
rules:
  - consumers: [{labels: {role: app}}]
    providers: [{labels: {role: db}}]
    services: [pg]
---
apiVersion: stockade.io/v1
kind: Workload
name: web-1
labels: {role: web}
mode: full
interfaces: [{name: eth0, addresses: [10.0.0.1, "fd00::1"]}]
---
apiVersion: stockade.io/v1
kind: Workload
name: db-1
labels: {role: db}
mode: full
interfaces: [{name: eth0, addresses: [10.0.0.2, "fd00::2"]}]
---
apiVersion: stockade.io/v1
kind: Workload
name: app-1
labels: {role: app}
mode: idle
interfaces: [{name: eth0, addresses: [10.0.0.3]}]
"""


def shop() -> Policy:
    p = load_documents(YAML, "shop.yaml")
    keyed = tuple(replace(w, wireguard=WireGuardIdentity(key_of(w.name))) for w in p.workloads)
    return replace(p, workloads=keyed)


def test_codec_yaml_and_rest_keep_encrypt() -> None:
    p = load_documents(YAML, "shop.yaml")
    shop_rs, vault = p.rulesets
    assert [r.encrypt for r in shop_rs.rules] == [False, True] and not shop_rs.encrypt
    assert vault.encrypt and vault.encrypts(0)
    assert ruleset_body(shop_rs)["rules"][1]["encrypt"] is True and "encrypt" not in ruleset_body(shop_rs)
    assert ruleset_body(vault)["encrypt"] is True
    assert load_documents(dump_policy(p), "again.yaml").rulesets == p.rulesets


def test_encrypt_with_an_ip_list_is_refused_naming_the_field() -> None:
    bad = YAML.replace("providers: [{labels: {role: db}}]\n    services: [pg, http]",
                       "providers: [{ip_list: office}]\n    services: [pg, http]")
    bad += "---\napiVersion: stockade.io/v1\nkind: IPList\nname: office\ninclude: [192.0.2.0/24]\n"
    with pytest.raises(ValidationError) as err:
        load_documents(bad, "bad.yaml")
    assert "rules[1].providers[0]" in str(err.value) and "encrypt" in str(err.value)
    with pytest.raises(ValidationError) as err:
        load_documents(YAML.replace("    encrypt: true\n", "    encrypt: yes please\n"), "x.yaml")
    assert "encrypt" in str(err.value)


def test_evaluator_encrypted_allow_wins_and_explain_says_so() -> None:
    ev = Evaluator(shop())
    web, db = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    e = ev.evaluate(web, db, Proto.TCP, 80)  # rule 1 (plain) and rule 2 (encrypted) both allow 80
    assert e.verdict is Verdict.ALLOWED and e.encrypted and e.encrypted_by == "ruleset/shop/1"
    assert e.outbound is not None and e.outbound.encrypted and e.inbound is not None and e.inbound.encrypted
    assert "encrypted by ruleset shop rule 2" in describe(e)
    v6 = ev.evaluate(ipaddress.ip_address("fd00::1"), ipaddress.ip_address("fd00::2"), Proto.TCP, 5432)
    assert v6.encrypted
    plain = ev.evaluate(db, web, Proto.TCP, 80)
    assert not plain.encrypted and plain.verdict is Verdict.BLOCKED
    # an idle consumer cannot run a tunnel: the provider never accepts it in the clear
    idle = ev.evaluate(ipaddress.ip_address("10.0.0.3"), db, Proto.TCP, 5432)
    assert idle.verdict is Verdict.BLOCKED and idle.inbound is not None and idle.inbound.action == "block"
    assert "cannot run WireGuard" in describe(idle)
    # a peer without a registered key: blocked too
    p = shop()
    nokey = replace(p, workloads=tuple(replace(w, wireguard=None) if w.name == "db-1" else w for w in p.workloads))
    assert Evaluator(nokey).evaluate(web, db, Proto.TCP, 5432).verdict is Verdict.BLOCKED


def test_impact_preview_shows_what_an_encrypt_change_drops() -> None:
    from stockade.visibility.flows import Connection, FlowKey
    from stockade.visibility.impact import ChangeKind, preview

    def seen(src: str, dst: str, port: int) -> Connection:
        key = FlowKey(ipaddress.ip_address(src), ipaddress.ip_address(dst), Proto.TCP, port)
        return Connection(key, Verdict.ALLOWED, 3, 0.0, 1.0)

    p = shop()
    active = replace(p, rulesets=tuple(replace(rs, encrypt=False) for rs in p.rulesets))
    # vault becomes encrypted; app-1 is idle
    impact = preview(active, p, [seen("10.0.0.3", "10.0.0.2", 5432), seen("10.0.0.1", "10.0.0.2", 5432)])
    assert [i.change for i in impact.items] == [ChangeKind.NEWLY_BLOCKED]
    assert "cannot run WireGuard" in impact.items[0].sentence and "vault rule 1" in impact.items[0].sentence


def test_compiler_peers_only_where_needed_and_json_round_trip() -> None:
    comp = Compiler(shop())
    web, db, app = (comp.host_policy(n) for n in ("web-1", "db-1", "app-1"))
    assert web.wireguard is not None and [p.workload for p in web.wireguard.peers] == ["db-1"]
    assert db.wireguard is not None and [p.workload for p in db.wireguard.peers] == ["web-1"]  # app-1 is idle
    peer = db.wireguard.peers[0]
    assert peer.public_key == key_of("web-1") and str(peer.endpoint) == "10.0.0.1"
    assert [str(n) for n in peer.allowed] == ["10.0.0.1/32", "fd00::1/128"]
    assert app.wireguard is None  # idle: the agent touches nothing, no tunnel either
    # encrypted allows come first in their tier (first match = the evaluator's "encrypted wins")
    allows = [r for r in web.rules if r.direction.value == "out"]
    assert [r.encrypt for r in allows] == sorted((r.encrypt for r in allows), reverse=True)
    assert host_policy_from_json(host_policy_to_json(db)) == db
    for name in ("web-1", "db-1", "app-1"):
        assert compile_host(comp.policy, name) == comp.host_policy(name)


def test_backends_without_wireguard_fail_closed() -> None:
    hp = Compiler(shop()).host_policy("db-1")
    assert Capability.ENCRYPT in NFTABLES_CAPABILITIES and Capability.ENCRYPT in IPTABLES_CAPABILITIES
    for name, caps in (("windows", WINDOWS_CAPABILITIES), ("ipfilter", IPFILTER_CAPABILITIES),
                       ("f5", F5_CAPABILITIES)):
        with pytest.raises(UnsupportedFeatureError) as err:
            check_capabilities(name, caps, hp)
        assert "WireGuard" in str(err.value)
    with pytest.raises(RenderError):  # nftables without a WireGuard interface: refused, not rendered plain
        render_nftables(hp)
    text = render_nftables(hp, wg_interface="stkwg0").to_text()
    assert 'iifname != "stkwg0"' in text and "type route hook output" in text
    with pytest.raises(RenderError):  # iptables likewise: no interface, no rendering in the clear
        render_iptables(hp)
    text = render_iptables(hp, wg_interface="stkwg0").to_text()
    assert "! -i stkwg0" in text and "*mangle" in text and "-j MARK --set-xmark 0x5745/0xffffffff" in text
    # eBPF likewise: without a WireGuard device the backend refuses; rendered, the encrypted allows are
    # allow-encrypted (tunnel only), never plain allows
    from stockade.backends.ebpf.backend import EBPF_CAPABILITIES, EbpfBackend
    from stockade.backends.ebpf.identity import Verdict as EbpfVerdict
    from stockade.backends.ebpf.render import render_ebpf

    assert Capability.ENCRYPT in EBPF_CAPABILITIES
    with pytest.raises(RenderError, match="WireGuard interface"):
        EbpfBackend().render(hp)
    verdicts = {(r.rule, r.verdict) for r in render_ebpf(hp).policy}
    encrypted = {i for i, name in enumerate(render_ebpf(hp).rules)
                 if any(r.encrypt and r.rule_id == name for r in hp.rules)}
    assert encrypted and all(v is EbpfVerdict.ALLOW_ENCRYPTED for i, v in verdicts if i in encrypted)


def test_malformed_public_keys_are_refused() -> None:
    for bad in ("", "abc", base64.b64encode(b"x" * 31).decode(), base64.b64encode(bytes(32)).decode(),
                key_of("a").rstrip("=")):
        with pytest.raises(ValidationError):
            validate_public_key(bad)
    assert validate_public_key(key_of("a")) == key_of("a")


# ---- properties: peers are the other side of the encrypted rules, incrementally ------------------

def _no_iplists(rs: Ruleset) -> Ruleset:
    rules = tuple(r for r in rs.rules
                  if not any(isinstance(s, IPListSelector) for s in r.consumers + r.providers))
    return replace(rs, rules=rules)


@st.composite
def encrypted_policy(draw: st.DrawFn) -> Policy:
    p = draw(ps.policy())
    rulesets = []
    for rs in p.rulesets:
        rs = _no_iplists(rs)
        rules = tuple(replace(r, encrypt=draw(st.booleans())) for r in rs.rules)
        rulesets.append(replace(rs, rules=rules, encrypt=draw(st.integers(0, 4)) == 0))
    workloads = tuple(replace(w, wireguard=WireGuardIdentity(key_of(w.name)) if draw(st.booleans()) else None)
                      for w in p.workloads)
    return replace(p, rulesets=tuple(rulesets), workloads=workloads)


@st.composite
def keyed_workload(draw: st.DrawFn) -> Workload:
    w = draw(ps.workload())
    key = draw(st.sampled_from([None, key_of(w.name), key_of(w.name + "-rotated")]))
    return replace(w, wireguard=WireGuardIdentity(key) if key else None)


def _expected_peers(policy: Policy, name: str) -> list[str]:
    """From the evaluator's point of view: workloads some encrypted rule relates to ``name``."""
    ev = Evaluator(policy)
    me = policy.workload_map()[name]
    out: list[str] = []
    if me.mode is EnforcementMode.IDLE:
        return out
    for other in policy.workloads:
        if other.name == name or other.mode is EnforcementMode.IDLE or other.wireguard is None:
            continue
        if not other.addresses:
            continue
        for c in ev._candidates:  # the rules themselves, scope and all
            if not c.encrypt:
                continue
            as_consumer = any(ev._workload_matches(s, me) for s in c.consumers) and \
                (not c.intra or ev._in_scope(me, c.scope)) and \
                any(ev._provider_peer(p, c, other.addresses[0], other) for p in c.providers)
            as_provider = ev._in_scope(me, c.scope) and any(ev._workload_matches(p, me) for p in c.providers) and \
                any(ev._consumer_peer(s, c, other.addresses[0], other) for s in c.consumers)
            if as_consumer or as_provider:
                out.append(other.name)
                break
    return out


@PROFILE
@given(encrypted_policy())
def test_peers_are_the_other_side_of_encrypted_rules(policy: Policy) -> None:
    comp = Compiler(policy)
    for name in comp.workload_names:
        hp = comp.host_policy(name)
        got = [p.workload for p in hp.wireguard.peers] if hp.wireguard is not None else []
        assert got == _expected_peers(policy, name)
        assert (hp.wireguard is not None) == (any(r.encrypt for r in hp.rules) and hp.mode is not EnforcementMode.IDLE)


@PROFILE
@given(encrypted_policy(), st.lists(st.one_of(st.tuples(st.just("upsert"), keyed_workload()),
                                              st.tuples(st.just("remove"), st.sampled_from(ps.NAMES))),
                                    min_size=1, max_size=8))
def test_incremental_with_keys_equals_full_recompile(policy: Policy, steps: list[tuple[str, object]]) -> None:
    """Incremental == full recompile, and what reaches each host equals it too: every host's
    history of deltas (set deltas and peer deltas, through the wire codec), applied step by step
    and composed from the first revision, gives exactly the recompiled policy; a change of peers
    alone (rotation, re-address, a peer coming or going) travels as a peer delta, never in full."""
    comp = Compiler(policy)
    start = comp.all_host_policies()
    histories = {name: HostHistory.begin(1, hp, limit=100) for name, hp in start.items()}
    for kind, arg in steps:
        before = comp.all_host_policies()
        if kind == "upsert":
            assert isinstance(arg, Workload)
            owners = {a: w.name for w in comp.policy.workloads for a in w.addresses if w.name != arg.name}
            if any(a in owners for a in arg.addresses):
                continue
            deltas = comp.upsert_workload(arg)
        else:
            assert isinstance(arg, str)
            if arg not in before:
                continue
            deltas = comp.remove_workload(arg)
        after = comp.all_host_policies()
        assert after == Compiler(comp.policy).all_host_policies()
        touched = {d.workload: d for d in deltas}
        for name in set(before) | set(after):
            if name not in touched:
                assert before.get(name) == after.get(name), f"{name} changed without a delta"
                continue
            if name not in before or name not in after:
                histories.pop(name, None)
                continue
            hist = histories.get(name)
            if hist is None:
                continue
            nxt = hist.after(touched[name], hist.revision + 1)
            if nxt is None:
                assert before[name] == after[name]
                continue
            histories[name] = nxt
            update = policy_update_from_dict(policy_update_to_dict(nxt.update_since(hist.revision)))
            assert apply_update(before[name], hist.revision, update) == after[name]
            if before[name].wireguard != after[name].wireguard and before[name].rules_key() == after[name].rules_key():
                assert update.kind is UpdateKind.DELTA and update.peer_delta, f"{name}: peers sent in full"
    for name, hist in histories.items():  # composed from the first revision: the same policy
        update = policy_update_from_dict(policy_update_to_dict(hist.update_since(1)))
        assert (apply_update(start[name], 1, update) or start[name]) == comp.host_policy(name)


def test_agent_gives_every_encrypting_backend_its_wireguard_device(tmp_path: Path) -> None:
    """A backend declaring ENCRYPT without a device would refuse every encrypted policy: the agent's
    list must be exactly the registry's encrypting backends (iptables joined nftables)."""
    from stockade.agent.main import ENCRYPTING_BACKENDS, make_backend
    from stockade.backends.registry import BACKENDS

    assert {n for n in BACKENDS if Capability.ENCRYPT in BACKENDS[n].capabilities} == ENCRYPTING_BACKENDS
    for name in sorted(ENCRYPTING_BACKENDS):
        assert make_backend(name, None, tmp_path).wireguard is not None


def test_the_map_counts_the_connections_the_policy_encrypts() -> None:
    """The map's edges carry how many of their connections the policy encrypts (the console's lock):
    web-1 -> db-1 on 80 is encrypted (rule 2 wins), db-1 -> web-1 is not; no rule encrypting: no
    evaluator is built and nothing is encrypted."""
    from stockade.visibility import EncryptionOracle, Link, map_of_links
    from stockade.visibility.flows import Endpoint, EndpointKind

    policy = shop()
    ends = {w.name: Endpoint(None, EndpointKind.WORKLOAD, w.name, w.labels) for w in policy.workloads}
    oracle = EncryptionOracle(policy)
    assert oracle(ends["web-1"], ends["db-1"], Proto.TCP, 80)
    assert not oracle(ends["db-1"], ends["web-1"], Proto.TCP, 80)
    internet = Endpoint(None, EndpointKind.INTERNET, "internet")
    assert not oracle(internet, ends["db-1"], Proto.TCP, 80)
    links = [Link(ends["web-1"], ends["db-1"], "80/tcp", Verdict.ALLOWED, 5, encrypted=True),
             Link(ends["web-1"], ends["db-1"], "22/tcp", Verdict.BLOCKED, 1)]
    (edge,) = map_of_links(policy, links, ("role",)).edges
    assert (edge.connections, edge.encrypted) == (2, 1)
    plain = replace(policy, rulesets=tuple(replace(rs, encrypt=False, rules=tuple(replace(r, encrypt=False)
                                                                                   for r in rs.rules))
                                           for rs in policy.rulesets))
    never = EncryptionOracle(plain)
    assert never._ev is None and not never(ends["web-1"], ends["db-1"], Proto.TCP, 80)
