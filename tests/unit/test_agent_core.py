"""Agent building blocks: state dir, wire decoding, set deltas, enforcer (tamper), backoff, host report."""

from __future__ import annotations

import ipaddress
import json
import random
import stat
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from stockade.agent.backoff import Backoff, BackoffPolicy
from stockade.agent.enforcer import Enforcer
from stockade.agent.fake import MemoryBackend, wait_until
from stockade.agent.host import host_report_from_netlink
from stockade.agent.state import CachedPolicy, Credential, StateDir
from stockade.agent.transport import UpdateKind, policy_update_from_dict
from stockade.agent.watch import CommandFeed, feed_for
from stockade.backends.base import Capability
from stockade.compiler import diff_sets, host_policy_to_dict
from stockade.compiler.delta import apply_set_deltas
from stockade.compiler.ir import AddressSet, Direction, HostPolicy, HostRule, SetDelta
from stockade.errors import ApplyError, ConflictError, UnsupportedFeatureError, ValidationError
from stockade.model.addresses import Family
from stockade.model.policy import Failsafe
from stockade.model.rules import Action
from stockade.model.services import Proto, ServiceEntry
from stockade.model.workloads import EnforcementMode

N = ipaddress.ip_network
A = ipaddress.ip_address


def host_policy(
    workload: str = "web1",
    peers: tuple[str, ...] = ("10.0.0.2/32",),
    mode: EnforcementMode = EnforcementMode.FULL,
    port: int = 80,
) -> HostPolicy:
    v4 = tuple(sorted((N(p) for p in peers if ":" not in p), key=lambda n: (int(n.network_address), n.prefixlen)))
    v6 = tuple(sorted((N(p) for p in peers if ":" in p), key=lambda n: (int(n.network_address), n.prefixlen)))
    return HostPolicy(
        workload=workload,
        mode=mode,
        local_addresses=(A("10.0.0.1"),),
        rules=(
            HostRule(Action.ALLOW, Direction.INBOUND, "ruleset/app/0", "peer1", (ServiceEntry(Proto.TCP, port, port),)),
        ),
        sets=(AddressSet("peer1", Family.V4, v4), AddressSet("peer1", Family.V6, v6)),
        failsafe=Failsafe(controller=(N("192.0.2.1/32"),)),
    )


# ---- state dir -------------------------------------------------------------------------------


def test_state_files_are_private_and_round_trip(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "state")
    assert sd.load_credential() is None and sd.load_policy() is None and sd.load_ca() is None
    cred = Credential("https://192.0.2.1:8443", "a1", "s3cret", "web1")
    sd.save_credential(cred)
    sd.save_ca("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    hp = host_policy()
    sd.save_policy(CachedPolicy(7, hp))
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for f in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert sd.load_credential() == cred
    assert "s3cret" not in repr(cred)
    cached = sd.load_policy()
    assert cached is not None and cached.revision == 7 and cached.policy == hp
    sd.wipe()
    assert not (tmp_path / "state").exists()


def test_corrupt_cache_is_a_validation_error_not_a_crash(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    sd.save_policy(CachedPolicy(1, host_policy()))
    (tmp_path / "policy.json").write_text('{"revision": 3, "policy": {"workload": "x"}}')
    with pytest.raises(ValidationError):
        sd.load_policy()
    (tmp_path / "policy.json").write_text("{not json")
    with pytest.raises(ValidationError):
        sd.load_policy()


def test_state_write_is_atomic_no_temp_files_left(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    for rev in range(5):
        sd.save_policy(CachedPolicy(rev, host_policy(port=1000 + rev)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.json"]
    loaded = sd.load_policy()
    assert loaded is not None and loaded.revision == 4 and loaded.policy.rules[0].services[0].first == 1004


def test_a_state_dir_that_need_not_survive_a_crash_skips_the_fsyncs(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's state (node agent): atomic like any, but no fsync (its namespace dies with the machine)."""
    import os

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    StateDir(tmp_path / "pod", durable=False).save_policy(CachedPolicy(3, host_policy()))
    assert synced == []
    loaded = StateDir(tmp_path / "pod").load_policy()
    assert loaded is not None and loaded.revision == 3
    assert sorted(p.name for p in (tmp_path / "pod").iterdir()) == ["policy.json"]
    StateDir(tmp_path / "host").save_policy(CachedPolicy(3, host_policy()))
    assert len(synced) == 2  # the file and its directory


def test_bad_ca_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        StateDir(tmp_path).save_ca("hello")


# ---- wire decoding ----------------------------------------------------------------------------


def test_policy_update_decodes_full_delta_and_unchanged() -> None:
    hp = host_policy()
    full = policy_update_from_dict({"revision": 3, "full": host_policy_to_dict(hp)})
    assert full.kind is UpdateKind.FULL and full.policy == hp and full.revision == 3
    wire_delta = {"name": "peer1", "family": 4, "added": ["10.0.0.9/32"], "removed": []}
    delta = policy_update_from_dict({"revision": 4, "base": 3, "set_deltas": [wire_delta]})
    assert delta.kind is UpdateKind.DELTA and delta.base == 3
    assert delta.set_deltas == (SetDelta("peer1", Family.V4, (N("10.0.0.9/32"),), ()),)
    assert policy_update_from_dict({"revision": 4, "base": 4, "set_deltas": []}).kind is UpdateKind.UNCHANGED


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"full": {}},
        {"revision": "x"},
        {"revision": 2, "full": {"workload": "w"}},
        {"revision": 2, "full": "text"},
        {"revision": 2, "base": 1, "set_deltas": [{"name": "p", "family": 5}]},
        {"revision": 2, "base": 1, "set_deltas": [{"name": "p", "family": 4, "added": ["not-an-ip"]}]},
        {"revision": 2, "base": 1, "set_deltas": "no"},
    ],
)
def test_malformed_answers_raise_validation_error(body: Any) -> None:
    with pytest.raises(ValidationError):
        policy_update_from_dict(body)


# ---- set deltas ---------------------------------------------------------------------------------


def test_apply_set_deltas_equals_the_new_policy() -> None:
    old = host_policy(peers=("10.0.0.2/32", "10.0.0.3/32", "fd00::2/128"))
    new = host_policy(peers=("10.0.0.3/32", "10.0.0.7/32", "10.0.1.0/24", "fd00::5/128"))
    deltas = diff_sets(old.sets, new.sets)
    assert deltas, "the test needs a real change"
    assert apply_set_deltas(old, deltas) == new


def test_apply_set_deltas_rejects_unknown_sets() -> None:
    with pytest.raises(ConflictError, match="unknown set"):
        apply_set_deltas(host_policy(), (SetDelta("nope", Family.V4, (N("10.9.9.9/32"),), ()),))


# ---- enforcer -----------------------------------------------------------------------------------


def test_enforcer_applies_detects_tamper_and_restores() -> None:
    be = MemoryBackend()
    enf = Enforcer(be)
    hp = host_policy()
    enf.enforce(hp)
    assert be.installed == hp and enf.check() is None
    be.tampered_text = ""  # "nft flush table"
    report = enf.check()
    assert report is not None and report.restored and report.summary == "table missing"
    assert be.installed == hp and be.tampered_text is None
    assert enf.check() is None
    be.installed = replace(hp, rules=())  # a rule deleted by hand
    report = enf.check()
    assert report is not None and report.restored and "differ" in report.summary
    assert be.installed == hp


def test_enforcer_unsupported_feature_keeps_previous_policy() -> None:
    be = MemoryBackend(frozenset(Capability) - {Capability.IPV6})
    enf = Enforcer(be)
    hp = host_policy()
    enf.enforce(hp)
    with pytest.raises(UnsupportedFeatureError):
        enf.enforce(host_policy(peers=("fd00::1/128",)))
    assert be.installed == hp and enf.policy == hp and enf.check() is None


def test_enforcer_apply_failure_keeps_previous_policy() -> None:
    be = MemoryBackend()
    enf = Enforcer(be)
    hp = host_policy()
    enf.enforce(hp)
    be.fail_apply = 1
    with pytest.raises(ApplyError):
        enf.enforce(host_policy(port=443))
    assert be.installed == hp and enf.policy == hp


def test_enforcer_verify_failure_is_an_apply_error_and_previous_is_put_back() -> None:
    be = MemoryBackend()
    enf = Enforcer(be)
    hp = host_policy()
    enf.enforce(hp)
    be.lose_applies = True
    with pytest.raises(ApplyError, match="differs"):
        enf.enforce(host_policy(port=443))
    be.lose_applies = False
    assert enf.policy == hp
    report = enf.check()  # the lost apply left nothing: the watcher restores the old policy
    assert report is not None and report.restored and be.installed == hp


def test_enforcer_idle_removes_and_stops_guarding() -> None:
    be = MemoryBackend()
    enf = Enforcer(be)
    enf.enforce(host_policy())
    enf.enforce(host_policy(mode=EnforcementMode.IDLE))
    assert be.installed is None and be.removes == 1
    be.tampered_text = "something else"
    assert enf.check() is None  # idle: the agent touches nothing


def test_enforcer_delta_changes_members_without_reload() -> None:
    be = MemoryBackend()
    enf = Enforcer(be)
    old = host_policy()
    new = host_policy(peers=("10.0.0.2/32", "10.0.0.8/32"))
    enf.enforce(old)
    enf.apply_delta(new, diff_sets(old.sets, new.sets))
    assert be.applies == 1 and be.deltas_applied == 1 and be.installed == new and enf.policy == new
    assert enf.check() is None
    with pytest.raises(ApplyError):  # rules differ: a delta cannot express it
        enf.apply_delta(host_policy(port=22), ())


def test_enforcer_delta_needs_the_capability() -> None:
    be = MemoryBackend(frozenset(Capability) - {Capability.SET_DELTAS})
    enf = Enforcer(be)
    old, new = host_policy(), host_policy(peers=("10.0.0.4/32",))
    enf.enforce(old)
    with pytest.raises(UnsupportedFeatureError):
        enf.apply_delta(new, diff_sets(old.sets, new.sets))
    assert be.installed == old


# ---- backoff --------------------------------------------------------------------------------------


def test_backoff_grows_caps_jitters_and_resets() -> None:
    b = Backoff(BackoffPolicy(initial=0.1, maximum=2.0, factor=2.0, jitter=0.5), random.Random(1))
    delays = [b.next_delay() for _ in range(10)]
    ceilings = [min(2.0, 0.1 * 2**i) for i in range(10)]
    for d, c in zip(delays, ceilings, strict=True):
        assert c * 0.5 <= d <= c
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
    b.reset()
    assert b.next_delay() <= 0.1
    with pytest.raises(ValueError):
        BackoffPolicy(initial=0)


# ---- host report ------------------------------------------------------------------------------------


@dataclass
class _Msg:
    fields: dict[str, Any]
    attrs: dict[str, Any]

    def get(self, key: str) -> Any:
        return self.fields.get(key)

    def get_attr(self, key: str) -> Any:
        return self.attrs.get(key)


def test_host_report_skips_loopback_and_link_local_and_sorts() -> None:
    links = [
        _Msg({"index": 1, "flags": 0x8 | 0x1}, {"IFLA_IFNAME": "lo"}),
        _Msg({"index": 2, "flags": 0x1}, {"IFLA_IFNAME": "eth1"}),
        _Msg({"index": 3, "flags": 0x1}, {"IFLA_IFNAME": "eth0"}),
    ]
    addrs = [
        _Msg({"index": 1}, {"IFA_ADDRESS": "127.0.0.1"}),
        _Msg({"index": 3}, {"IFA_ADDRESS": "fe80::1"}),
        _Msg({"index": 3}, {"IFA_ADDRESS": "fd00::2"}),
        _Msg({"index": 3}, {"IFA_ADDRESS": "10.0.0.9", "IFA_LOCAL": "10.0.0.2"}),  # peer-to-peer: local wins
        _Msg({"index": 2}, {"IFA_ADDRESS": "192.0.2.7"}),
    ]
    report = host_report_from_netlink(links, addrs, "h1", "Linux")
    assert [i.name for i in report.interfaces] == ["eth0", "eth1"]
    assert report.interfaces[0].addresses == (A("10.0.0.2"), A("fd00::2"))
    assert report.addresses == (A("10.0.0.2"), A("192.0.2.7"), A("fd00::2"))
    assert json.loads(json.dumps(report.to_dict()))["interfaces"][1] == {"name": "eth1", "addresses": ["192.0.2.7"]}


# ---- change feeds -------------------------------------------------------------------------------------


def test_command_feed_pokes_per_change_line_and_at_its_end() -> None:
    pokes: list[float] = []
    done = threading.Event()

    def poke() -> None:
        pokes.append(time.monotonic())
        if len(pokes) == 3:
            done.set()

    # Like nft monitor: lines written apart in time, the program keeps running between them.
    script = (
        "import time; print('delete rule inet stockade inbound handle 4'); time.sleep(0.3);"
        "print('# new generation 7'); time.sleep(0.3); print('add element x'); time.sleep(0.3)"
    )
    feed = CommandFeed([sys.executable, "-c", script])
    feed.start(poke)
    assert done.wait(10.0)
    assert len(pokes) == 3  # two changes (the comment is not one), then the end of the feed
    assert pokes[1] - pokes[0] > 0.4, "each change arrives when printed, not when the buffer fills"
    assert wait_until(lambda: not feed.alive, 5.0)
    feed.stop()


def test_feeds_come_from_the_backends_change_monitor_not_its_name() -> None:
    assert feed_for(Enforcer(MemoryBackend()).change_monitor) is None

    class Renamed(MemoryBackend):
        name = "nftables"  # a name alone gives no feed

    assert feed_for(Enforcer(Renamed()).change_monitor) is None

    class Monitored(MemoryBackend):
        def change_monitor(self) -> tuple[str, ...]:
            return ("ip", "netns", "exec", "ns1", "nft", "monitor")

    feed = feed_for(Enforcer(Monitored()).change_monitor)
    assert isinstance(feed, CommandFeed)
    assert feed.argv == ["ip", "netns", "exec", "ns1", "nft", "monitor"]
