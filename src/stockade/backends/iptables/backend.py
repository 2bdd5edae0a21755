"""The iptables+ipset backend: peers in ipsets, rules in Stockade's own chains, applied atomically.

For hosts where nftables is not an option. Both kernel APIs are supported through their
binaries: ``iptables-legacy*`` (x_tables) and ``iptables-nft*`` (nf_tables), v4 and v6.
Rendering is pure (:mod:`stockade.backends.iptables.render`); the scripts an apply loads
are built by :mod:`stockade.backends.iptables.scripts`; this module runs them in order
and undoes what already happened when a step fails.

Apply, and what a failure leaves:

1. the rollback point, what of ours the filter tables hold now: what this backend last wrote,
   while the tables' token (:mod:`stockade.backends.iptables.generation`: the nf_tables
   generation, or the x_tables shape) is unchanged since; otherwise ``iptables-save``/
   ``ip6tables-save -t filter``, run concurrently with one ``ipset -exist restore`` that
   loads every set's new members under ``<name>-t`` and swaps them onto the live names
   (that load always runs). Failure: the swaps done are swapped
   back, the temporary sets destroyed; nothing else was touched.
2. ``iptables-restore --noflush`` and ``ip6tables-restore --noflush`` of our chains (each
   one kernel transaction; concurrent for iptables-nft, one after the other for legacy,
   whose restores share the xtables lock). Failure of one: the other family's chains are
   put back from the rollback point, the sets swapped back; the previous ruleset is in force
   again. A failure with a remembered rollback point is retried once from a fresh read.
3. the temporary sets (now holding the previous members) and sets no rule uses any more
   are destroyed.

Between steps 1 and 2 the previous rules already see the new members: the state a set-only
delta would produce, as each set is named after its selector. Set deltas are ipset
netlink messages (:mod:`stockade.backends.iptables.ipset_netlink`: no process, ~0.03 ms
for one peer; any set missing fails before any change, any other refusal is undone; adding a
present member or deleting an absent one is not an error). When the kernel refuses ipset
over netlink (or ``delta_path=DeltaPath.IPSET_CLI``) they are one ``ipset -exist restore`` of
``del``/``add`` lines with the same contract for missing sets; :attr:`IptablesBackend.delta_path_used`
says which path is in use (logged when the fallback is taken). The netlink socket is kept
between deltas; ``close()`` releases it (it pins its network namespace). Idle and ``remove``
delete our chains, the jumps to them and our sets, and nothing else: built-in chains are
never flushed and their policies never set, other chains and sets never named.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

from stockade.backends.base import (
    Capability,
    NflogFlows,
    VerifyReport,
    check_capabilities,
    check_delta_capabilities,
)
from stockade.backends.common import in_netns, rule_difference
from stockade.backends.iptables.generation import table_token
from stockade.backends.iptables.ipset_netlink import IpsetNetlink, SetChange
from stockade.backends.iptables.model import (
    ChainNames,
    DeltaPath,
    Hook,
    IpSet,
    IptablesVariant,
    Layout,
    address_text,
    ipset_members,
)
from stockade.backends.iptables.render import IptablesArtifact, ipset_name, render_iptables, validate_prefix
from stockade.backends.iptables.runner import Command, IpsetHeader, IptablesRunner, Result, parse_ipset_save
from stockade.backends.iptables.scripts import (
    FilterState,
    Jump,
    ipset_delta_script,
    ipset_destroy_script,
    ipset_swap_script,
    parse_filter_save,
    removal_script,
    rollback_script,
    rules_script,
)
from stockade.backends.iptables.tunnel import NO_MANGLE, MangleState, mangle_problems, mangle_script, parse_mangle_save
from stockade.backends.wireguard import Tunnel, WireGuardDevice, tunnel_datapath, tunnel_peer_delta
from stockade.compiler.ir import HostPolicy, PeerDelta, SetDelta, WireGuardConfig
from stockade.errors import ApplyError, BackendError, RenderError
from stockade.model.addresses import Family

IPTABLES_CAPABILITIES = frozenset(Capability)  # encrypt: with a WireGuard device (else rendering refuses it)
FAMILIES = (Family.V4, Family.V6)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """Everything of ours the kernel holds, read in one go."""

    states: dict[Family, FilterState]
    sets: dict[str, IpsetHeader]
    mangle: dict[Family, MangleState]


class IptablesBackend:
    """iptables+ipset enforcement for one host (or one network namespace)."""

    name = "iptables"
    capabilities: frozenset[Capability] = IPTABLES_CAPABILITIES

    def __init__(
        self,
        variant: IptablesVariant | str = IptablesVariant.NFT,
        chain_prefix: str = "STOCKADE",
        netns: str | None = None,
        log_group: int = 100,
        *,
        forward: bool = False,
        layout: Layout | str = Layout.LOOKUP,
        flow_log: bool = True,
        wireguard: WireGuardDevice | None = None,
        delta_path: DeltaPath = DeltaPath.NETLINK,
    ) -> None:
        try:
            self.variant = IptablesVariant(variant)
            self.prefix = validate_prefix(chain_prefix)
            self.layout = Layout(layout)
        except (ValueError, RenderError) as exc:
            raise ApplyError(str(exc)) from exc
        self.netns = netns
        self.log_group = log_group
        self.forward = forward
        self.flow_log = flow_log
        self.runner = IptablesRunner(self.variant, netns)
        self._names = ChainNames(self.prefix)
        self.wireguard = wireguard  # the tunnel of encrypted rules (None: they fail to render)
        self._tunnel = Tunnel(wireguard) if wireguard is not None else None
        self._steering_maybe = True  # our mangle chains may exist (unknown until an apply looked)
        self.delta_path = delta_path  # asked for
        self._delta_path_used: DeltaPath | None = None if delta_path is DeltaPath.NETLINK else delta_path
        self._netlink: IpsetNetlink | None = None  # opened by the first netlink delta
        # our part of the filter tables as last written or read, valid while the tables' token is
        # unchanged (:mod:`stockade.backends.iptables.generation`): an apply then skips iptables-save
        self._known: dict[Family, FilterState] | None = None
        self._known_token: Hashable | None = None

    @property
    def delta_path_used(self) -> DeltaPath | None:
        """The path set deltas take (None until the first delta has probed the kernel)."""
        return self._delta_path_used

    @property
    def set_prefix(self) -> str:
        """Every ipset of ours is named ``<prefix>-...``."""
        return self.prefix + "-"

    # ---- pure ------------------------------------------------------------------------
    def render(self, host_policy: HostPolicy) -> IptablesArtifact:
        check_capabilities(self.name, self.capabilities, host_policy)
        return render_iptables(
            host_policy,
            self.prefix,
            self.variant,
            forward=self.forward,
            log_group=self.log_group,
            layout=self.layout,
            flow_log=self.flow_log,
            wg_interface=self.wireguard.name if self.wireguard is not None else None,
        )

    # ---- kernel ----------------------------------------------------------------------
    def apply(self, artifact: IptablesArtifact) -> None:
        """Put ``artifact`` in force (idle: remove everything of ours); ApplyError keeps the old one."""
        if artifact.prefix != self.prefix or artifact.variant is not self.variant:
            raise ApplyError(
                f"artifact is for iptables-{artifact.variant.value} prefix {artifact.prefix!r}, "
                f"backend is iptables-{self.variant.value} prefix {self.prefix!r}"
            )
        if not artifact.present:
            self.remove()
            return
        steering = bool(artifact.mangle) or self._steering_maybe  # read the mangle table only then
        token = self._token()
        known = self._known if token is not None and token == self._known_token and not steering else None
        self._forget()  # re-learnt by a successful apply
        try:
            self._apply(artifact, known, token, steering)
        except ApplyError:
            if known is None:
                raise
            # what we remembered may not be what the kernel holds after all: read it, try once more
            self._apply(artifact, None, self._token(), steering)

    def _forget(self) -> None:
        self._known, self._known_token = None, None

    def _token(self) -> Hashable | None:
        return table_token(self.variant, self.netns)

    def _apply(
        self, artifact: IptablesArtifact, known: dict[Family, FilterState] | None, token: Hashable | None,
        steering: bool,
    ) -> None:
        """One attempt: ``known`` is our part of the filter tables as last written or read, still
        in force (the token says so); None: read it with ``iptables-save`` (the rollback point)."""
        r = self.runner
        load = artifact.ipset_load
        mangle_families = self._mangle_families() if steering else ()
        reads = [] if known is not None else [r.save_cmd(Family.V4), r.save_cmd(Family.V6)]
        loaded, *rest = r.run_all([r.ipset_cmd(load.text), *reads, *(r.save_cmd(f, "mangle") for f in mangle_families)])
        saves = dict(zip(FAMILIES, rest[: len(reads)], strict=True)) if reads else {}
        msaves = rest[len(reads) :]
        mangle = {f: parse_mangle_save(res.stdout, self.prefix) for f, res in zip(mangle_families, msaves, strict=True)}
        states = known or {f: parse_filter_save(res.stdout, self.prefix, f) for f, res in saves.items() if res.ok}
        before = frozenset(loaded.stdout.split())  # what ``list -n`` printed before any change
        if not loaded.ok:
            line = loaded.error_line() or 0
            done = load.swapped[: max(0, line - load.swap_line)]
            self._undo_sets(done, artifact.sets, before)
            raise ApplyError(f"ipset refused the new sets (nothing changed): {loaded.message()}")
        failed_save = [res for res in (*saves.values(), *msaves) if not res.ok]
        if failed_save:
            self._undo_sets(artifact.sets, artifact.sets, before)
            raise ApplyError(f"cannot read the current rules (nothing changed): {failed_save[0].message()}")

        # the filter table and the steering in one restore per family: the guards and the marks together
        scripts = {
            f: rules_script(artifact.ruleset(f), states[f], self.prefix)
            + mangle_script(artifact.mangle_ruleset(f), mangle.get(f, NO_MANGLE), self.prefix)
            for f in FAMILIES
        }
        results = self._restore(scripts)
        failed = [f for f, res in results.items() if not res.ok]
        if failed:
            problems = [results[f].message() for f in failed]
            for f in FAMILIES:
                if f in results and results[f].ok:
                    undo = r.run(r.restore_cmd(f, rollback_script(states[f], artifact.ruleset(f), self.prefix)))
                    if not undo.ok:
                        problems.append(f"ROLLBACK FAILED, IPv{f.value} chains hold the new rules: {undo.message()}")
            self._undo_sets(artifact.sets, artifact.sets, before)
            raise ApplyError("iptables refused the new rules (previous rules and sets kept): " + "; ".join(problems))

        self._remember(artifact, states, token)
        keep = {s.name for s in artifact.sets}
        stale = sorted(n for n in before if n.startswith(self.set_prefix) and n not in keep)
        self._destroy_sets([*(s.temp_name for s in artifact.sets), *stale])
        self._steering_maybe = bool(artifact.mangle)
        # the rules first: their guards drop encrypted traffic outside the tunnel while it comes up
        if self._tunnel is not None:
            self._tunnel.apply(artifact.wireguard, artifact.local_addresses)

    def _remember(self, artifact: IptablesArtifact, states: dict[Family, FilterState], token: Hashable | None) -> None:
        """After our restores: our part of the filter tables is what ``artifact`` wrote over ``states``.

        Kept only when the new token proves (iptables-nft: the generation moved by exactly our two
        commits) or suggests (legacy) that nothing else changed the tables meanwhile, and only for
        the plain shape (no steering, at most our one jump per hook), whose result is certain.
        """
        if token is None or artifact.mangle:
            return
        after = self._token()
        if after is None:
            return
        if self.variant is IptablesVariant.NFT and not (isinstance(token, int) and after == token + len(FAMILIES)):
            return  # someone else committed in between
        known: dict[Family, FilterState] = {}
        for f in FAMILIES:
            ruleset, state = artifact.ruleset(f), states[f]
            jumps: list[Jump] = []
            for hook in ruleset.hooks:
                exact = f"-j {self._names.entry(hook)}"
                mine = [j for j in state.jumps if j.hook is hook]
                if any(j.spec != exact for j in mine) or len(mine) > 1:
                    return  # odd jumps were cleaned up: where ours ended up is not certain
                jumps.append(Jump(hook, mine[0].position if mine else 1, exact))
            known[f] = FilterState(f, ruleset.chains, tuple(jumps))
        self._known, self._known_token = known, after

    def _mangle_families(self) -> tuple[Family, ...]:
        """Families whose ``mangle`` table may hold our steering. ``iptables-legacy-save -t mangle``
        would create the table in a namespace without one (a trace on a host we never encrypted
        on), so legacy reads only tables the kernel lists as loaded in the namespace."""
        if self.variant is IptablesVariant.NFT:
            return FAMILIES

        def loaded() -> tuple[Family, ...]:
            out = []
            for family, names in ((Family.V4, "ip_tables_names"), (Family.V6, "ip6_tables_names")):
                try:
                    text = Path(f"/proc/thread-self/net/{names}").read_text()
                except OSError:
                    text = ""
                if "mangle" in text.split():
                    out.append(family)
            return tuple(out)

        return in_netns(self.netns, loaded)

    def _restore(self, scripts: dict[Family, str]) -> dict[Family, Result]:
        """Load each family's rules script; the results of those that ran.

        iptables-nft restores run concurrently (independent nf_tables transactions); legacy
        ones hold the shared xtables lock, so they run one after the other and IPv6 is not
        tried once IPv4 failed.
        """
        r = self.runner
        if self.variant is IptablesVariant.NFT:
            return dict(zip(FAMILIES, r.run_all([r.restore_cmd(f, scripts[f]) for f in FAMILIES]), strict=True))
        results: dict[Family, Result] = {}
        for f in FAMILIES:
            results[f] = r.run(r.restore_cmd(f, scripts[f]))
            if not results[f].ok:
                break
        return results

    def _undo_sets(self, swapped: tuple[IpSet, ...], sets: tuple[IpSet, ...], before: frozenset[str]) -> None:
        """Swap back ``swapped``, destroy the temporary sets and the live sets this apply created."""
        if swapped:
            self.runner.run(self.runner.ipset_cmd(ipset_swap_script(swapped)))
        created = [s.name for s in sets if s.name not in before]
        self._destroy_sets([*(s.temp_name for s in sets), *created])

    def _destroy_sets(self, names: list[str]) -> None:
        """Destroy sets, skipping any the kernel refuses (still referenced by someone)."""
        remaining = names
        while remaining:
            res = self.runner.run(self.runner.ipset_cmd(ipset_destroy_script(remaining)))
            line = res.error_line()
            if res.ok or line is None:
                return
            remaining = remaining[line:]

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        """Add and delete set members (``ipset -exist restore``); rules are not touched.

        Raises ApplyError, with nothing changed, when a set does not exist.
        """
        check_delta_capabilities(self.name, self.capabilities, deltas)
        changes = [
            (ipset_name(self.prefix, d.name, d.family), d.family, d.added, d.removed)
            for d in deltas
            if d.added or d.removed
        ]
        if not changes:
            return
        channel = self._delta_channel()
        if channel is not None:
            channel.change([SetChange(name, family, added, removed) for name, family, added, removed in changes])
            return
        script = ipset_delta_script((name, added, removed) for name, _, added, removed in changes)
        res = self.runner.run(self.runner.ipset_cmd(script))
        if not res.ok:
            raise ApplyError(f"ipset refused the set delta: {res.message()}")

    def _delta_channel(self) -> IpsetNetlink | None:
        """The netlink channel for deltas, opened and probed once; None: use the ``ipset`` command."""
        if self._delta_path_used is DeltaPath.IPSET_CLI:
            return None
        if self._netlink is None:
            try:
                channel = IpsetNetlink(self.netns)
            except ApplyError as exc:
                self._fall_back(exc)
                return None
            try:
                channel.probe()
            except ApplyError as exc:
                channel.close()
                self._fall_back(exc)
                return None
            self._netlink = channel
            self._delta_path_used = DeltaPath.NETLINK
        return self._netlink

    def _fall_back(self, exc: ApplyError) -> None:
        log.warning("iptables backend: ipset over netlink refused (%s); set deltas use the ipset command", exc)
        self._delta_path_used = DeltaPath.IPSET_CLI

    def snapshot(self) -> Snapshot:
        """Our chains and jumps in both families, and our sets with their members."""
        r = self.runner
        families = self._mangle_families()
        save4, save6, sets, *msaves = r.run_all([
            r.save_cmd(Family.V4), r.save_cmd(Family.V6), Command(("ipset", "save")),
            *(r.save_cmd(f, "mangle") for f in families)])
        for res in (save4, save6, sets, *msaves):
            if not res.ok:
                raise BackendError(res.message())
        states = {
            Family.V4: parse_filter_save(save4.stdout, self.prefix, Family.V4),
            Family.V6: parse_filter_save(save6.stdout, self.prefix, Family.V6),
        }
        mangle = {f: NO_MANGLE for f in FAMILIES}
        mangle.update({f: parse_mangle_save(res.stdout, self.prefix) for f, res in zip(families, msaves, strict=True)})
        return Snapshot(states, parse_ipset_save(sets.stdout, self.set_prefix), mangle)

    def wireguard_datapath(self) -> str:
        """The tunnel's WireGuard implementation ("kernel", "wireguard-go"; "": none up)."""
        return tunnel_datapath(self._tunnel)

    def apply_peer_delta(self, old: WireGuardConfig, delta: PeerDelta) -> None:
        """WireGuard peers set / removed over the control socket; the ruleset is not touched."""
        tunnel_peer_delta(self._tunnel, old, delta)

    def read_back(self) -> str:
        """Our sets, chains and jumps as text (counter-free, sorted sets); "" when none exist."""
        snap = self.snapshot()
        lines: list[str] = []
        for name in sorted(snap.sets):
            s = snap.sets[name]
            lines.append(f"create {name} {s.type_name} family {s.family}")
            lines += [f"add {name} {m}" for m in s.members]
        for family in FAMILIES:
            state = snap.states[family]
            if state.empty:
                continue
            lines.append(f"*filter IPv{family.value}")
            lines += [f"-A {j.hook.value} {j.spec}" for j in state.jumps]
            for chain in state.chains:
                lines.append(f":{chain.name}")
                lines += [f"-A {chain.name} {rule}" for rule in chain.rules]
        for family in FAMILIES:
            mstate = snap.mangle[family]
            if mstate.empty:
                continue
            lines.append(f"*mangle IPv{family.value}")
            lines += [f"-A {hook} {spec}" for hook, spec in mstate.jumps]
            for name, rules in mstate.chains.items():
                lines.append(f":{name}")
                lines += [f"-A {name} {rule}" for rule in rules]
        return "\n".join(lines) + "\n" if lines else ""

    def remove(self) -> None:
        """Delete our chains, every jump to them and our sets; touch nothing else. Idempotent."""
        self._forget()
        r = self.runner
        families = self._mangle_families()
        save4, save6, *msaves = r.run_all([r.save_cmd(Family.V4), r.save_cmd(Family.V6),
                                           *(r.save_cmd(f, "mangle") for f in families)])
        for res in (save4, save6, *msaves):
            if not res.ok:
                raise ApplyError(f"cannot read the current rules: {res.message()}")
        mangle = {f: parse_mangle_save(res.stdout, self.prefix) for f, res in zip(families, msaves, strict=True)}
        cmds = []
        for family, res in ((Family.V4, save4), (Family.V6, save6)):
            script = removal_script(parse_filter_save(res.stdout, self.prefix, family), self.prefix) or ""
            script += mangle_script(None, mangle.get(family, NO_MANGLE), self.prefix)
            if script:
                cmds.append(r.restore_cmd(family, script))
        failed = [res for res in (r.run_all(cmds) if cmds else []) if not res.ok]
        if failed:
            raise ApplyError("cannot remove Stockade's chains: " + "; ".join(res.message() for res in failed))
        try:
            names = [n for n in r.ipset_names() if n.startswith(self.set_prefix)]
        except BackendError as exc:
            raise ApplyError(str(exc)) from exc
        self._destroy_sets(sorted(names))
        self._steering_maybe = False
        if self._tunnel is not None:
            self._tunnel.remove()

    def close(self) -> None:
        """Release the netlink socket kept for deltas (it pins its network namespace)."""
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    def __enter__(self) -> IptablesBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def flow_source(self) -> NflogFlows:
        """New connections (lookup layout) and would-be drops are logged to NFLOG ``log_group`` (in ``netns``)."""
        return NflogFlows(self.log_group)

    def verify(self, expected: IptablesArtifact) -> VerifyReport:
        """Compare what the kernel holds with ``expected`` (tamper and drift detection)."""
        snap = self.snapshot()
        problems: list[str] = []
        if not expected.present:
            problems += [f"set {n} exists but should not" for n in sorted(snap.sets)]
            for family in FAMILIES:
                state = snap.states[family]
                problems += [f"IPv{family.value} chain {c.name} exists but should not" for c in state.chains]
                problems += [f"IPv{family.value} {j.hook.value} jumps to {j.spec} but should not" for j in state.jumps]
                problems += mangle_problems(None, snap.mangle[family], self.prefix)
            return VerifyReport(tuple(problems))
        problems += _set_problems(expected.sets, snap.sets)
        for family in FAMILIES:
            problems += self._chain_problems(expected, snap.states[family])
            problems += mangle_problems(expected.mangle_ruleset(family), snap.mangle[family], self.prefix)
        if self._tunnel is not None:
            problems += self._tunnel.problems(expected.wireguard)
        return VerifyReport(tuple(problems))

    def _chain_problems(self, expected: IptablesArtifact, state: FilterState) -> list[str]:
        tag = f"IPv{state.family.value}"
        ruleset = expected.ruleset(state.family)
        have = {c.name: c for c in state.chains}
        problems: list[str] = []
        for chain in ruleset.chains:
            got = have.pop(chain.name, None)
            if got is None:
                problems.append(f"{tag} chain {chain.name} is missing")
            elif got.rules != chain.rules:
                problems.append(f"{tag} {rule_difference(chain.name, chain.rules, got.rules)}")
        problems += [f"{tag} unexpected chain {name}" for name in sorted(have)]
        for hook in Hook:
            exact = f"-j {self._names.entry(hook)}"
            jumps = [j for j in state.jumps if j.hook is hook]
            count = sum(1 for j in jumps if j.spec == exact)
            want = 1 if hook in ruleset.hooks else 0
            if count != want:
                problems.append(f"{tag} {hook.value} has {count} jumps to {self._names.entry(hook)}, expected {want}")
            problems += [f"{tag} {hook.value} has an unexpected rule {j.spec!r}" for j in jumps if j.spec != exact]
        return problems


def _members_text(members: list[str], limit: int = 5) -> str:
    shown = ", ".join(members[:limit])
    return shown + (f" (+{len(members) - limit} more)" if len(members) > limit else "")


def _set_problems(expected: tuple[IpSet, ...], actual: dict[str, IpsetHeader]) -> list[str]:
    problems: list[str] = []
    have = dict(actual)
    for s in expected:
        got = have.pop(s.name, None)
        if got is None:
            problems.append(f"set {s.name} is missing")
            continue
        if (got.type_name, got.family) != ("hash:net", s.ipset_family):
            problems.append(
                f"set {s.name}: type {got.type_name} family {got.family}, expected hash:net {s.ipset_family}"
            )
        want = {address_text(m) for m in ipset_members(s.members)}  # the spelling ipset prints
        present = set(got.members)
        missing = sorted(want - present)
        extra = sorted(present - want)
        if missing:
            problems.append(f"set {s.name}: missing {_members_text(missing)}")
        if extra:
            problems.append(f"set {s.name}: unexpected {_members_text(extra)}")
    problems += [f"unexpected set {name}" for name in sorted(have)]
    return problems


__all__ = ["IPTABLES_CAPABILITIES", "IptablesBackend", "IptablesVariant"]
