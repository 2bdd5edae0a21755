"""Set membership as BDD variables: the proof over every address without sweeping the addresses.

The prover's fast path (:func:`symbolic_members`): instead of cutting the address axis into
classes and walking the rules once per class, each address predicate (a policy set, a kernel
set) becomes a BDD over fresh *membership variables*, and the policy and the kernel are each
evaluated ONCE over them; the cost is the rules', not the peers'. This applies when the
kernel's sets are the policy's sets (equal contents: one variable), or a policy set split into
disjoint parts whose union it is (nftables' ``_host`` / ``_net``: one variable per part, at most
one true; parts are matched to their set by name). Variables of different sets are independent,
so some assignments are realizable by no address (in A and not in B although A is inside B):
equality for every assignment is a proof; a difference may be unrealizable and only sends the
prover to the class sweep, which finds a real packet.

(The eBPF datapath's sets are identities, not policy sets; its classes come from them directly:
:func:`stockade.verify.space.atom_classes`.)

Pure: ranges in, BDDs out; None when neither applies (the caller sweeps address classes).
"""

from __future__ import annotations

from stockade.model.addresses import Family, Range, merge_ranges
from stockade.verify.space import BDDNode, HeaderSpace
from stockade.verify.spec import CONTROLLER_PRED

Members = tuple[dict[int, BDDNode], BDDNode]  # predicate -> membership BDD, constraint


def symbolic_members(
    space: HeaderSpace,
    family: Family,
    ranges: list[tuple[Range, ...]],
    spec_pred: dict[str, int],
    kernel_pred: dict[str, int],
) -> Members | None:
    """Membership BDDs for every predicate (see the module doc), or None."""
    return _named_parts(space, family, ranges, spec_pred, kernel_pred)


def _named_parts(
    space: HeaderSpace,
    family: Family,
    ranges: list[tuple[Range, ...]],
    spec_pred: dict[str, int],
    kernel_pred: dict[str, int],
) -> tuple[dict[int, BDDNode], BDDNode] | None:
    """Membership of every predicate as a BDD over fresh variables, when the kernel's sets are
    the policy's sets: equal contents (one predicate, one variable), or a policy set split
    into disjoint kernel sets whose union it is (nftables' ``_host`` / ``_net``: one variable
    each, at most one true, the policy set their OR). Empty sets are false. None when some
    kernel set is neither (the exact class sweep then decides).

    Proving equality for EVERY assignment of these variables proves it for the assignments
    real addresses have (a subset), so a proof here is a proof; a difference found here may be
    unrealizable, so it is only a reason to run the sweep, which finds the real packet."""
    # A kernel set named ``<policy set>_v<family>_<part>`` is a part of that policy set; parts
    # are grouped by NAME (equal contents share one predicate, so two policy sets can share a
    # part's predicate: the same /31 in both, say). A part equal to its owner is the owner.
    prefix = {f"{name}_v{family.value}_": s for name, s in spec_pred.items() if name != CONTROLLER_PRED}
    spec_ids = set(spec_pred.values())
    groups: dict[int, list[int]] = {}
    for kname, k in kernel_pred.items():
        owner = _owner(kname, family, prefix)
        if owner is None:
            if k not in spec_ids and ranges[k]:
                return None  # neither a policy set nor a part of one
            continue
        if k != owner and ranges[k]:
            groups.setdefault(owner, [])
            if k not in groups[owner]:
                groups[owner].append(k)
    parts_used = {k for parts in groups.values() for k in parts}
    if parts_used & set(groups):
        return None  # a composite set that is also a part of another: not modelled here
    for owner, parts in groups.items():
        merged = merge_ranges(r for k in parts for r in ranges[k])
        size = sum(hi - lo + 1 for k in parts for lo, hi in ranges[k])
        if merged != ranges[owner] or size != sum(hi - lo + 1 for lo, hi in ranges[owner]):
            return None
    bdd = space.bdd
    members: dict[int, BDDNode] = {}
    constraint = space.true
    fresh = [f"m{family.value}_{i}" for i in range(len(ranges))]
    bdd.declare(*fresh)  # below the header variables: a decision list over them stays linear
    for i, r in enumerate(ranges):
        members[i] = bdd.var(fresh[i]) if r else space.false
    for owner, parts in groups.items():
        members[owner] = space.false
        for j, k in enumerate(parts):
            members[owner] = members[owner] | members[k]
            for k2 in parts[j + 1:]:
                constraint = constraint & ~(members[k] & members[k2])
    return members, constraint


def _owner(kname: str, family: Family, prefix: dict[str, int]) -> int | None:
    """The policy set a kernel set named ``<name>_v<family>_<part>`` is a part of, if any."""
    cut = kname.rfind(f"_v{family.value}_")
    if cut < 0:
        return None
    return prefix.get(kname[: cut + len(f"_v{family.value}_")])

