"""The IPFilter backend (AIX, Solaris, illumos): pools first, rules into the inactive set, swap.

``apply`` is atomic from the packet's point of view:

1. the active slot is read from ``ippool -l`` (pools numbered 10000+ or 20000+) and the new
   pools are created in the *other* slot (``ippool -A`` for empty pools, ``ippool -f`` for
   the rest), so the rules in force keep their pools;
2. the inactive rule lists are flushed and loaded (``ipf -I -Fa``, ``ipf -6 -I -Fa``,
   ``ipf -I -f ipf.conf``, ``ipf -6 -I -f ipf6.conf``); nothing of this is in force yet;
3. ``ipf -s`` swaps the inactive and active sets in one step;
4. the now-inactive old rules are flushed and the old slot's pools removed.

If a step before the swap fails, the inactive set is flushed, the new pools removed and
ApplyError raised: the old rules are untouched. IPFilter has one rule set per zone and no
per-owner tables, so this backend owns the zone's rules and the pools 10000-29999; ``remove``
swaps in an empty set (IPFilter then passes everything) and removes those pools.

``apply_delta`` adds and removes pool members (``ippool -a``/``ippool -r``) in the active
slot without touching rules; with ``inline_v6`` an IPv6 delta re-applies the whole policy.
Every command is an argv list; the executor is injectable (no ipf here: tests use a fake).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from stockade.backends.base import WITHOUT_ENCRYPTION, Capability, check_capabilities
from stockade.backends.common import CommandResult, Executor, executor_with_timeout
from stockade.backends.ipfilter.render import BACKEND_NAME, MAX_POOLS, IpfilterArtifact, Slot, render_ipfilter
from stockade.backends.setalgebra import policy_after_deltas
from stockade.compiler.ir import HostPolicy, SetDelta
from stockade.errors import ApplyError
from stockade.model.addresses import Family

# SCTP: ipf's port keyword takes tcp/udp only; an SCTP rule would lose its ports
IPFILTER_CAPABILITIES = WITHOUT_ENCRYPTION - {Capability.SCTP}
IPF_TIMEOUT_S = 120.0
_POOL_NUMBER_RE = re.compile(r"(?:number|name)\s*=\s*(\d+)")

subprocess_executor = executor_with_timeout(IPF_TIMEOUT_S)


class IpfRunner:
    """Runs ``ipf`` and ``ippool`` (argv lists) through an injectable executor."""

    def __init__(self, executor: Executor = subprocess_executor, ipf: str = "ipf", ippool: str = "ippool") -> None:
        self.executor = executor
        self.ipf = ipf
        self.ippool = ippool

    def run(self, argv: Sequence[str], check: bool = True) -> CommandResult:
        result = self.executor(argv)
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise ApplyError(f"{' '.join(argv)} failed (exit {result.returncode}): {detail[:2000]}")
        return result

    def pool_numbers(self) -> set[int]:
        """Stockade's pools loaded now (numbers 10000-29999)."""
        out = self.run([self.ippool, "-l", "-t", "tree"]).stdout
        numbers = {int(n) for n in _POOL_NUMBER_RE.findall(out)}
        return {n for n in numbers if Slot.A.value <= n < Slot.B.value + MAX_POOLS}

    def remove_pool(self, number: int, check: bool = False) -> None:
        self.run([self.ippool, "-R", "-m", str(number), "-o", "ipf", "-t", "tree"], check=check)

    def flush_inactive(self, check: bool = True) -> None:
        self.run([self.ipf, "-I", "-Fa"], check=check)
        self.run([self.ipf, "-6", "-I", "-Fa"], check=check)


@contextmanager
def _temp_file(text: str, suffix: str) -> Iterator[str]:
    fd, path = tempfile.mkstemp(prefix="stockade-", suffix=suffix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        yield path
    finally:
        os.unlink(path)


def _slot_of(numbers: set[int]) -> Slot | None:
    if not numbers:
        return None
    return Slot.A if min(numbers) < Slot.B.value else Slot.B


class IpfilterBackend:
    """IPFilter enforcement for one host (or zone)."""

    name = BACKEND_NAME
    capabilities: frozenset[Capability] = IPFILTER_CAPABILITIES

    def __init__(
        self,
        loopback: str = "lo0",
        *,
        inline_v6: bool = False,
        executor: Executor = subprocess_executor,
        ipf: str = "ipf",
        ippool: str = "ippool",
    ) -> None:
        self.loopback = loopback
        self.inline_v6 = inline_v6
        self.runner = IpfRunner(executor, ipf, ippool)
        self._applied: tuple[IpfilterArtifact, Slot] | None = None

    # ---- pure ------------------------------------------------------------------------
    def render(self, host_policy: HostPolicy) -> IpfilterArtifact:
        check_capabilities(self.name, self.capabilities, host_policy)
        return render_ipfilter(host_policy, self.loopback, inline_v6=self.inline_v6)

    # ---- host ------------------------------------------------------------------------
    def apply(self, artifact: IpfilterArtifact) -> None:
        r = self.runner
        existing = r.pool_numbers()
        active = _slot_of(existing)
        slot = Slot.A if active is None else active.other
        new_numbers = set(artifact.pool_numbers(slot))
        for n in sorted(existing):
            if (n >= Slot.B.value) == (slot is Slot.B):  # leftovers of an earlier failed apply
                r.remove_pool(n)
        try:
            for p in artifact.pools:
                if not p.members:
                    r.run([r.ippool, "-A", "-m", str(slot.value + p.index), "-o", "ipf", "-t", "tree"])
            if any(p.members for p in artifact.pools):
                with _temp_file(artifact.ippool_conf(slot), ".pools") as path:
                    r.run([r.ippool, "-f", path])
            r.flush_inactive()
            with _temp_file(artifact.ipf_conf(Family.V4, slot), ".ipf") as v4:
                r.run([r.ipf, "-I", "-f", v4])
            with _temp_file(artifact.ipf_conf(Family.V6, slot), ".ipf6") as v6:
                r.run([r.ipf, "-6", "-I", "-f", v6])
            r.run([r.ipf, "-s"])
        except ApplyError:
            r.flush_inactive(check=False)
            for n in sorted(new_numbers):
                r.remove_pool(n)
            raise
        # in force now: clean up the old rules (inactive after the swap) and the old pools
        r.flush_inactive(check=False)
        for n in sorted(existing - new_numbers):
            r.remove_pool(n)
        self._applied = (artifact, slot) if artifact.present else None

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        new_hp = policy_after_deltas(self.name, self.capabilities,
                                     self._applied[0].host_policy if self._applied else None, deltas)
        if new_hp is None or self._applied is None:
            return
        artifact, slot = self._applied
        if self.inline_v6 and any(d.family is Family.V6 for d in deltas):
            self.apply(render_ipfilter(new_hp, self.loopback, inline_v6=True))
            return
        r = self.runner
        commands: list[list[str]] = []
        for d in deltas:
            try:
                number = str(slot.value + artifact.pool(d.name, d.family).index)
            except KeyError as exc:
                raise ApplyError(f"set {d.name} ({d.family.name}) has no pool: reload the policy") from exc
            commands += [[r.ippool, "-a", "-m", number, "-o", "ipf", "-i", str(n)] for n in d.added]
            commands += [[r.ippool, "-r", "-m", number, "-o", "ipf", "-i", str(n)] for n in d.removed]
        for argv in commands:  # additions first: a moved peer is never briefly in neither pool
            r.run(argv)
        updated = render_ipfilter(new_hp, self.loopback, inline_v6=self.inline_v6)
        self._applied = (updated, slot)

    def read_back(self) -> str:
        """Active rules (``ipfstat -io``, both families) and Stockade's pools, as listed."""
        r = self.runner
        parts = [
            r.run(["ipfstat", "-io"]).stdout,
            r.run(["ipfstat", "-6", "-io"]).stdout,
            r.run([r.ippool, "-l", "-t", "tree"]).stdout,
        ]
        text = "\n".join(p.strip() for p in parts if p.strip())
        return text + "\n" if text else ""

    def remove(self) -> None:
        r = self.runner
        r.flush_inactive()
        r.run([r.ipf, "-s"])
        r.flush_inactive(check=False)
        for n in sorted(r.pool_numbers()):
            r.remove_pool(n)
        self._applied = None
