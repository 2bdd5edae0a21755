"""Which WireGuard datapath runs and how it is configured (backends/wgconf.py, backends/wireguard.py).

The kernel module is absent on the CI machine, so these tests pin down, without it: the choice
read from ``STOCKADE_WIREGUARD``; the fallback decision on ``ip link add`` errors (only a missing
module falls back; forcing ``kernel`` never does, and its error says the traffic stays dropped);
the ``wg`` argv the kernel path uses (a list, keys validated before any argv is built, the
private key passed as a file name); the parsing of ``wg show NAME dump`` and of the UAPI answer;
and the agent's one ``wireguard-datapath`` event. tests/kernel/test_wireguard_datapath.py runs the
same configurator against real wireguard-go devices.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from stockade.agent.fake import FakeController
from stockade.agent.main import make_backend
from stockade.agent.transport import EventKind
from stockade.backends import wireguard
from stockade.backends.wgconf import (
    ENV,
    Datapath,
    DatapathChoice,
    InterfaceState,
    PeerState,
    UapiConfigurator,
    WgToolConfigurator,
    datapath_of,
    no_module,
    parse_uapi,
    parse_wg_dump,
    wg_interface_args,
    wg_peer_args,
)
from stockade.backends.wireguard import WireGuardDevice
from stockade.compiler.ir import WireGuardConfig, WireGuardPeer
from stockade.errors import ApplyError, ValidationError
from tests.unit.test_agent_core import host_policy
from tests.unit.test_agent_loop import Harness, wait

KEY_A = base64.b64encode(bytes(range(1, 33))).decode()
KEY_B = base64.b64encode(bytes(range(2, 34))).decode()


def peer(key: str = KEY_A, endpoint: str = "10.0.0.2", nets: tuple[str, ...] = ("10.0.0.2/32",)) -> WireGuardPeer:
    return WireGuardPeer("db1", key, ipaddress.ip_address(endpoint), 51820,
                         tuple(ipaddress.ip_network(n) for n in nets))


# ---- the choice ------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "choice"), [
    (None, DatapathChoice.AUTO), ("", DatapathChoice.AUTO), ("auto", DatapathChoice.AUTO),
    ("kernel", DatapathChoice.KERNEL), ("KERNEL ", DatapathChoice.KERNEL), ("userspace", DatapathChoice.USERSPACE),
])
def test_choice_from_the_environment(value: str | None, choice: DatapathChoice) -> None:
    assert DatapathChoice.from_env({} if value is None else {ENV: value}) is choice


def test_a_bad_choice_names_the_variable() -> None:
    with pytest.raises(ValidationError) as exc:
        DatapathChoice.from_env({ENV: "wireguard-go; rm -rf /"})
    assert exc.value.issues[0].field == ENV and "auto, kernel, userspace" in exc.value.issues[0].message


@pytest.mark.parametrize(("stderr", "missing"), [
    ("Error: Unknown device type.", True),  # iproute2 on this machine
    ("RTNETLINK answers: Operation not supported", True),  # EOPNOTSUPP
    ("RTNETLINK answers: File exists", False),
    ("RTNETLINK answers: Operation not permitted", False),
])
def test_only_a_missing_module_falls_back(stderr: str, missing: bool) -> None:
    assert no_module(stderr) is missing


# ---- creation: kernel first, wireguard-go on a missing module, never when forced ---------------
class Recorder:
    def __init__(self, kernel_error: str | None) -> None:
        self.kernel_error = kernel_error
        self.kernel_tries = 0
        self.ran: list[list[str]] = []

    def create_kernel_link(self, name: str, netns: str | None) -> str | None:
        self.kernel_tries += 1
        return self.kernel_error

    def run(self, argv: list[str], what: str) -> str:
        self.ran.append(argv)
        raise ApplyError("stop here")  # the test is about the decision, not wireguard-go


@pytest.fixture()
def device(tmp_path: Path) -> Iterator[tuple[WireGuardDevice, Recorder, pytest.MonkeyPatch]]:
    with pytest.MonkeyPatch.context() as mp:
        dev = WireGuardDevice("wgtest0", None, tmp_path / "key", DatapathChoice.AUTO)
        rec = Recorder("Error: Unknown device type.")
        mp.setattr(wireguard, "create_kernel_link", rec.create_kernel_link)
        mp.setattr(dev, "_run", rec.run)
        yield dev, rec, mp


def test_auto_tries_the_kernel_then_falls_back_to_wireguard_go(device: tuple[WireGuardDevice, Recorder,
                                                                              pytest.MonkeyPatch]) -> None:
    dev, rec, _ = device
    with pytest.raises(ApplyError, match="stop here"):
        dev._create()
    assert rec.kernel_tries == 1 and rec.ran == [["wireguard-go", "wgtest0"]]


def test_auto_uses_the_kernel_module_and_the_wg_tool_when_present(device: tuple[WireGuardDevice, Recorder,
                                                                                pytest.MonkeyPatch]) -> None:
    dev, rec, _ = device
    rec.kernel_error = None
    assert dev._create() is Datapath.KERNEL and rec.ran == []
    dev.datapath = Datapath.KERNEL
    assert isinstance(dev.config, WgToolConfigurator)
    dev.datapath = Datapath.USERSPACE
    assert isinstance(dev.config, UapiConfigurator)


def test_forced_kernel_without_the_module_fails_closed(device: tuple[WireGuardDevice, Recorder,
                                                                     pytest.MonkeyPatch]) -> None:
    dev, rec, _ = device
    dev.choice = DatapathChoice.KERNEL
    with pytest.raises(ApplyError) as exc:
        dev._create()
    msg = str(exc.value)
    assert "Unknown device type" in msg and "STOCKADE_WIREGUARD=kernel" in msg and "stays dropped" in msg
    assert rec.ran == []  # no wireguard-go


def test_another_kernel_error_does_not_fall_back(device: tuple[WireGuardDevice, Recorder,
                                                               pytest.MonkeyPatch]) -> None:
    dev, rec, _ = device
    rec.kernel_error = "RTNETLINK answers: Operation not permitted"
    with pytest.raises(ApplyError, match="Operation not permitted"):
        dev._create()
    assert rec.ran == []


def test_forced_userspace_never_tries_the_kernel(device: tuple[WireGuardDevice, Recorder,
                                                               pytest.MonkeyPatch]) -> None:
    dev, rec, _ = device
    dev.choice = DatapathChoice.USERSPACE
    with pytest.raises(ApplyError, match="stop here"):
        dev._create()
    assert rec.kernel_tries == 0 and rec.ran == [["wireguard-go", "wgtest0"]]


def test_the_device_reads_its_choice_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "kernel")
    assert WireGuardDevice("wgtest0", None, tmp_path / "k").choice is DatapathChoice.KERNEL
    monkeypatch.setenv(ENV, "bogus")
    with pytest.raises(ValidationError):
        WireGuardDevice("wgtest0", None, tmp_path / "k")


TUN = ("2: wgx: <POINTOPOINT,MULTICAST,NOARP> mtu 1420 qdisc noop state DOWN mode DEFAULT group default qlen 500"
       "\\    link/none  promiscuity 0  allmulti 0 minmtu 68 maxmtu 65535 \\    tun type tun pi on vnet_hdr off "
       "persist off addrgenmode eui64 numtxqueues 1")  # measured here (wireguard-go)
KERNEL = ("5: wg0: <POINTOPOINT,NOARP,UP,LOWER_UP> mtu 1420 qdisc noqueue state UNKNOWN mode DEFAULT group default "
          "qlen 1000\\    link/none  promiscuity 0 minmtu 0 maxmtu 2147483552 \\    wireguard addrgenmode none "
          "numtxqueues 1")  # iproute2's layout for a kernel WireGuard link


def test_an_existing_interface_s_datapath_is_read_from_ip_link() -> None:
    assert datapath_of(TUN) is Datapath.USERSPACE
    assert datapath_of(KERNEL) is Datapath.KERNEL
    assert datapath_of(TUN.replace("wgx:", "wireguard0:")) is Datapath.USERSPACE  # the name is not the kind


def test_a_bad_choice_stops_the_agent_before_it_touches_anything(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "modprobe")
    with pytest.raises(ValidationError, match=ENV):
        make_backend("nftables", None, tmp_path)


# ---- the wg tool's arguments -----------------------------------------------------------------
def test_peer_argv_is_a_list_with_the_allowed_addresses_replaced() -> None:
    assert wg_peer_args(peer(nets=("10.0.0.2/32", "fd00::2/128"))) == [
        "peer", KEY_A, "endpoint", "10.0.0.2:51820", "allowed-ips", "10.0.0.2/32,fd00::2/128"]
    assert wg_peer_args(peer(endpoint="fd00::2"))[3] == "[fd00::2]:51820"
    assert wg_peer_args(peer(nets=()))[-1] == ""  # wg clears them


@pytest.mark.parametrize("bad", ["AAAA", "-h", KEY_A + " remove", base64.b64encode(bytes(32)).decode(), ""])
def test_a_malformed_key_never_reaches_an_argv(bad: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[object] = []
    monkeypatch.setattr("stockade.backends.wgconf.run_command", lambda *a, **k: ran.append(a))
    conf = WgToolConfigurator("wgtest0", None)
    with pytest.raises(ValidationError):
        conf.set_peer(peer(key=bad))
    with pytest.raises(ValidationError):
        conf.remove_peer(bad)
    with pytest.raises(ValidationError):
        conf.set_endpoint(peer(key=bad))
    assert ran == []


def test_interface_argv_names_the_key_file_never_the_key(tmp_path: Path) -> None:
    key = tmp_path / "wg.key"
    assert wg_interface_args(key, 51820, 0x5747) == ["private-key", str(key), "listen-port", "51820",
                                                      "fwmark", "0x5747"]
    assert wg_interface_args(None, None, 0) == ["fwmark", "off"]
    assert wg_interface_args(None, None, None) == []


def test_an_invalid_interface_name_is_refused() -> None:
    with pytest.raises(ApplyError, match="interface name"):
        WgToolConfigurator("wg0; reboot", None)


# ---- read-back ---------------------------------------------------------------------------------
DUMP = (
    "EDg7It3y6Ff4ya+5HkbHlitk9QKmcIE85sJo2C+hNmg=\ttu4sz8y2ESxe8ljXCf8Brc1/xe/GrIUBTQG7IY8TEUY=\t5111\t0x5747\n"
    "OBBXcanY2AjpAAnEjhKcnZo3K3rvkgIAHIEgOXLWeUM=\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
    "/6CwmUTvGVBQtBCPW9HrUGxQ6Jh267Nl6f/Lfzj7yHQ=\t(none)\t[fd00::1]:51820\t10.1.0.0/24,fd00::/64\t1700000000"
    "\t92\t148\toff\n"
)


def test_wg_dump_is_parsed() -> None:
    iface, peers = parse_wg_dump(DUMP)
    assert iface == InterfaceState(base64.b64decode("EDg7It3y6Ff4ya+5HkbHlitk9QKmcIE85sJo2C+hNmg=").hex(),
                                   5111, 0x5747)
    assert peers == {
        "OBBXcanY2AjpAAnEjhKcnZo3K3rvkgIAHIEgOXLWeUM=": PeerState(
            "OBBXcanY2AjpAAnEjhKcnZo3K3rvkgIAHIEgOXLWeUM=", "", frozenset(), 0),
        "/6CwmUTvGVBQtBCPW9HrUGxQ6Jh267Nl6f/Lfzj7yHQ=": PeerState(
            "/6CwmUTvGVBQtBCPW9HrUGxQ6Jh267Nl6f/Lfzj7yHQ=", "[fd00::1]:51820",
            frozenset({"10.1.0.0/24", "fd00::/64"}), 1700000000),
    }
    assert parse_wg_dump("(none)\t(none)\t0\toff\n") == (InterfaceState("", 0, 0), {})


@pytest.mark.parametrize("bad", ["", "a\tb\n", "(none)\t(none)\t0\toff\nkey\tonly-three\tfields\n"])
def test_a_malformed_dump_is_an_apply_error(bad: str) -> None:
    with pytest.raises(ApplyError, match="wg show dump"):
        parse_wg_dump(bad)


def test_uapi_answer_is_parsed_to_the_same_shape() -> None:
    text = (f"private_key={'11' * 32}\nlisten_port=51820\nfwmark=22343\n"
            f"public_key={base64.b64decode(KEY_A).hex()}\nendpoint=10.0.0.2:51820\n"
            "last_handshake_time_sec=5\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n"
            f"public_key={base64.b64decode(KEY_B).hex()}\nerrno=0\n\n")
    iface, peers = parse_uapi(text)
    assert iface == InterfaceState("11" * 32, 51820, 22343)
    assert peers[KEY_A] == PeerState(KEY_A, "10.0.0.2:51820", frozenset({"10.0.0.2/32", "fd00::2/128"}), 5)
    assert peers[KEY_B] == PeerState(KEY_B, "", frozenset(), 0)


# ---- the agent reports the datapath ------------------------------------------------------------
def test_the_agent_reports_the_datapath_once_per_change(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeController())
    try:
        hp = replace(host_policy(), wireguard=WireGuardConfig(51820, (peer(),)))
        h.controller.publish(hp)
        a = h.agent()
        a.start()
        assert wait(lambda: h.events(EventKind.WIREGUARD_DATAPATH) == ["WireGuard datapath: wireguard-go"])
        h.backend.datapath = "kernel"
        h.controller.publish(replace(hp, wireguard=WireGuardConfig(51821, (peer(),))))
        assert wait(lambda: h.events(EventKind.WIREGUARD_DATAPATH) == ["WireGuard datapath: wireguard-go",
                                                                       "WireGuard datapath: kernel"])
        plain = host_policy()
        h.controller.publish(plain)  # no rule encrypts: no tunnel, nothing to report
        assert wait(lambda: h.backend.installed == plain)
        assert len(h.events(EventKind.WIREGUARD_DATAPATH)) == 2
    finally:
        h.stop()
