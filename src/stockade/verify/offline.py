"""Prove a rendered artifact offline, before it is applied: the text a host would load, read as if loaded.

For iptables+ipset, :func:`iptables_save_texts` writes the ``iptables-save`` /
``ip6tables-save`` / ``ipset save`` output a host would show right after applying the
artifact on an empty filter table (built-in chains with policy ACCEPT, one jump each), and
:func:`prove_iptables_artifact` proves it against the HostPolicy with the same parser the
live read-back uses. nftables artifacts are proven only as loaded (the JSON listing comes
from ``nft`` itself).
"""

from __future__ import annotations

from stockade.backends.iptables.model import ChainNames, address_text, ipset_members
from stockade.backends.iptables.render import IptablesArtifact
from stockade.backends.iptables.tunnel import mangle_chain_names
from stockade.compiler.ir import HostPolicy
from stockade.model.addresses import Family
from stockade.verify.ipt_readback import parse_iptables
from stockade.verify.loaded import LoadedRuleset
from stockade.verify.prove import Proof, prove


def iptables_save_texts(artifact: IptablesArtifact) -> tuple[str, str, str]:
    """(iptables-save, ip6tables-save, ipset save) of ``artifact`` applied on an empty table."""
    saves: list[str] = []
    for family in (Family.V4, Family.V6):
        lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        if artifact.present:
            ruleset = artifact.ruleset(family)
            lines += [f":{c.name} - [0:0]" for c in ruleset.chains]
            names = ChainNames(artifact.prefix)
            lines += [f"-A {hook.value} -j {names.entry(hook)}" for hook in ruleset.hooks]
            for c in ruleset.chains:
                lines += [f"-A {c.name} {r}" for r in c.rules]
        lines.append("COMMIT")
        steering = artifact.mangle_ruleset(family) if artifact.present else None
        if steering is not None:  # encrypted rules: the mangle table's steering, one jump per hook
            steer, post = mangle_chain_names(artifact.prefix)
            lines += ["*mangle", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                      ":OUTPUT ACCEPT [0:0]", ":POSTROUTING ACCEPT [0:0]", f":{steer} - [0:0]", f":{post} - [0:0]",
                      f"-A OUTPUT -j {steer}", f"-A POSTROUTING -j {post}"]
            lines += [f"-A {steer} {r}" for r in steering.steer] + [f"-A {post} {r}" for r in steering.post]
            lines.append("COMMIT")
        saves.append("\n".join(lines) + "\n")
    sets: list[str] = []
    for s in artifact.sets if artifact.present else ():
        sets.append(s.create_line(s.name))
        sets += [f"add {s.name} {address_text(m)}" for m in ipset_members(s.members)]
    return saves[0], saves[1], "\n".join(sets) + "\n"


def loaded_iptables_artifact(artifact: IptablesArtifact, wg_interface: str | None = None) -> LoadedRuleset:
    """``wg_interface``: the WireGuard interface the artifact was rendered for (encrypted rules)."""
    v4, v6, ipsets = iptables_save_texts(artifact)
    return parse_iptables(v4, v6, ipsets, variant=artifact.variant.value, wg_interface=wg_interface)


def prove_iptables_artifact(hp: HostPolicy, artifact: IptablesArtifact, wg_interface: str | None = None) -> Proof:
    return prove(hp, loaded_iptables_artifact(artifact, wg_interface))
