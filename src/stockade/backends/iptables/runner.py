"""Running ``iptables-*-save``/``-restore`` and ``ipset`` (optionally inside a network namespace).

Every command is an argv list (never a shell); scripts go to the binary's standard input.
With ``netns`` the argv is prefixed by ``nsenter --net=/run/netns/<netns>`` (half the cost
of ``ip netns exec``, which also remounts /sys). Independent commands (the two families'
saves and the set load; the two iptables-nft restores) run concurrently. A legacy restore
waits for the xtables lock (``-w``, polled every 10 ms) rather than failing when another
program holds it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from stockade.backends.common import nsenter_argv, run_command, validate_netns
from stockade.backends.iptables.model import IptablesVariant
from stockade.errors import ApplyError, BackendError
from stockade.model.addresses import Family

TIMEOUT_S = 120.0
LOCK_WAIT_S = 30
_LINE_RE = re.compile(r"Error in line (\d+)")


@dataclass(frozen=True)
class Result:
    """One finished command."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_line(self) -> int | None:
        """The failing line an ``ipset restore`` reports ("Error in line N"), if any."""
        m = _LINE_RE.search(self.stderr)
        return int(m.group(1)) if m else None

    def message(self) -> str:
        return f"{self.argv[0] if self.argv else '?'}: {self.stderr.strip() or f'exit status {self.returncode}'}"


@dataclass(frozen=True)
class Command:
    """A command to run: argv (without the namespace prefix) and its standard input."""

    argv: tuple[str, ...]
    stdin: str | None = None


@dataclass(frozen=True)
class IpsetHeader:
    """One set as ``ipset save`` declares it, with its members as printed (sorted text).

    Members stay text: ``ipset`` prints them with ``inet_ntop``, as
    :func:`~stockade.backends.iptables.model.address_text` formats ours, and parsing 100k
    addresses into objects would cost seconds on every tamper check.
    """

    name: str
    type_name: str
    family: str
    members: tuple[str, ...]


class IptablesRunner:
    """Runs one variant's binaries in one network namespace (None: the current one)."""

    def __init__(self, variant: IptablesVariant, netns: str | None = None) -> None:
        self.variant = variant
        self.netns = validate_netns(netns)

    # ---- commands -------------------------------------------------------------------
    def save_cmd(self, family: Family, table: str = "filter") -> Command:
        return Command((self.variant.tool(family, "save"), "-t", table))

    def restore_cmd(self, family: Family, script: str) -> Command:
        # legacy: wait for the xtables lock, polling every 10 ms (the default interval is 1 s)
        wait = ("-w", str(LOCK_WAIT_S), "-W", "10000") if self.variant is IptablesVariant.LEGACY else ()
        return Command((self.variant.tool(family, "restore"), *wait, "--noflush"), script)

    @staticmethod
    def ipset_cmd(script: str) -> Command:
        return Command(("ipset", "-exist", "restore"), script)

    # ---- running --------------------------------------------------------------------
    def argv(self, cmd: Command) -> list[str]:
        return nsenter_argv(self.netns, cmd.argv)

    def run(self, cmd: Command) -> Result:
        try:  # argv list; names validated
            proc = run_command(self.argv(cmd), TIMEOUT_S, cmd.stdin, what=cmd.argv[0])
        except ApplyError as exc:
            return Result(cmd.argv, -1, "", str(exc))
        return Result(cmd.argv, proc.returncode, proc.stdout, proc.stderr)

    def run_all(self, cmds: Sequence[Command]) -> list[Result]:
        """Run independent commands concurrently; results in the order given."""
        if len(cmds) == 1:
            return [self.run(cmds[0])]
        with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
            return list(pool.map(self.run, cmds))

    def checked(self, cmd: Command) -> str:
        result = self.run(cmd)
        if not result.ok:
            raise BackendError(result.message())
        return result.stdout

    # ---- reading --------------------------------------------------------------------
    def ipset_names(self) -> list[str]:
        return self.checked(Command(("ipset", "list", "-n"))).split()

    def ipset_save(self) -> str:
        return self.checked(Command(("ipset", "save")))


def parse_ipset_save(text: str, keep: str) -> dict[str, IpsetHeader]:
    """Sets whose name starts with ``keep``, from ``ipset save`` output, by name."""
    headers: dict[str, tuple[str, str]] = {}
    members: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3 or not parts[1].startswith(keep):
            continue
        if parts[0] == "create":
            words = line.split()
            family = words[words.index("family") + 1] if "family" in words else "inet"
            headers[parts[1]] = (parts[2], family)
            members.setdefault(parts[1], [])
        elif parts[0] == "add":
            members.setdefault(parts[1], []).append(parts[2])
    return {
        name: IpsetHeader(name, type_name, family, tuple(sorted(members[name])))
        for name, (type_name, family) in headers.items()
    }
