"""Full applies and read-backs of an nftables table over netlink, with no ``nft`` process.

Why: a new pod's first apply was ``ip netns exec <pod> nft -f`` and two listings, three
processes in the pod's namespace: 28-70 ms each on a quiet node, 300-450 ms together at load
30-45 (bench/README.md, k8s.py, session 5), most of the time left between a pod's enrolment and
its policy in force. And every pod's tamper check and every set delta's new baseline was one
more ``nft list`` (11 processes a second at rest with 110 pods).

How (see :mod:`.template`): the first table of a *shape* (its policy less its peer sets'
members, the same for every pod of a label set) is loaded by ``nft -f`` once per node agent,
into a scratch namespace nobody else uses, checked there by the ``nft`` path's own structural
verify, and dumped over netlink into a :class:`~.template.TableTemplate`. A pod's apply is then
one nf_tables batch on a socket opened inside the pod's namespace: add the table if missing,
delete it, add it again with the template's chains, sets, maps and rules and the artifact's
peer-set members, exactly the ``table; delete table; definition`` transaction of ``nft -f``:
all of it is in force or none (the CNI's default-deny stays). The read-back is a netlink dump in
the same namespace: the structural verify compares it with the template (every chain, rule,
set declaration and map element byte for byte, counters zeroed) and each peer set with the
artifact's members as address ranges; :func:`~.template.canonical` of the same dump is the
tamper baseline, and :meth:`NetlinkTableBackend.read_back` (tamper checks, set deltas) is the
same dump again.

Falls back to ``nft -f`` (never to anything wider), declared by :func:`netlink_unsupported`:
an idle artifact (the table is only deleted), a WireGuard tunnel (brought up beside the
table), a shape whose table holds stateful objects, flowtables or xtables-compat rules, and a
batch or template the kernel refuses (logged; the nft path then applies the same artifact).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections import OrderedDict
from typing import Any

from stockade.backends.base import VerifyReport
from stockade.backends.common import NETNS_DIR, validate_netns
from stockade.backends.nftables.backend import NftablesBackend, _ranges_text
from stockade.backends.nftables.dump import TableDump, dump_table
from stockade.backends.nftables.netlink import NftNetlink
from stockade.backends.nftables.render import NftablesArtifact
from stockade.backends.nftables.runner import NftRunner
from stockade.backends.nftables.template import (
    TableTemplate,
    canonical,
    set_ranges,
    shape_key,
    shape_of,
    table_batch,
    template_from_dump,
    without_elements,
)
from stockade.errors import ApplyError, BackendError
from stockade.model.addresses import AddressRanges

log = logging.getLogger(__name__)
MAX_SHAPES = 64
_SCRATCH_RE = re.compile(r"^stk-tpl-(\d+)-[0-9a-f]{6}$")


def netlink_unsupported(artifact: NftablesArtifact) -> str | None:
    """Why ``artifact`` goes through ``nft -f`` instead (None: it is applied over netlink)."""
    if not artifact.present:
        return "an idle artifact only deletes the table"
    if artifact.wireguard is not None:
        return "a WireGuard tunnel is brought up beside the table"
    return None


class TemplateCache:
    """Templates by shape, learnt in one scratch namespace (created on first use, deleted by
    :meth:`close`). Thread-safe; shared by every pod backend of a node agent."""

    def __init__(self, max_shapes: int = MAX_SHAPES) -> None:
        self.max_shapes = max_shapes
        self._templates: OrderedDict[tuple[str, str], TableTemplate] = OrderedDict()
        self._lock = threading.Lock()
        self._scratch: str | None = None
        self.learnt = 0

    def template_for(self, artifact: NftablesArtifact) -> TableTemplate:
        key = (artifact.table, shape_key(artifact))
        with self._lock:
            found = self._templates.get(key)
            if found is not None:
                self._templates.move_to_end(key)
                return found
            template = self._learn(artifact)
            self._templates[key] = template
            while len(self._templates) > self.max_shapes:
                self._templates.popitem(last=False)
            return template

    def get(self, artifact: NftablesArtifact) -> TableTemplate | None:
        with self._lock:
            return self._templates.get((artifact.table, shape_key(artifact)))

    def _learn(self, artifact: NftablesArtifact) -> TableTemplate:
        if self._scratch is None:
            _delete_stale_scratch()
            name = validate_netns(f"stk-tpl-{os.getpid()}-{os.urandom(3).hex()}")
            assert name is not None
            proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise ApplyError(f"cannot create the template namespace: {proc.stderr.strip()}")
            self._scratch = name
        shape = shape_of(artifact)
        scratch = NftablesBackend(artifact.table, netns=self._scratch, layout=artifact.layout)
        runner = NftRunner(self._scratch)
        try:
            runner.load(shape.to_text())
            report = scratch.verify(shape)  # the nft path's own check of what it loaded
            if not report.ok:
                raise ApplyError("template table differs from its artifact: " + "; ".join(report.problems))
            dump = dump_table(artifact.table, self._scratch)
        finally:
            try:
                runner.load(f"table inet {artifact.table}\ndelete table inet {artifact.table}\n")
            except BackendError:
                log.warning("template table not removed from %s", self._scratch)
        if dump is None:
            raise ApplyError("template table vanished before it was read back")
        self.learnt += 1
        return template_from_dump(dump, shape)

    def close(self) -> None:
        with self._lock:
            if self._scratch is not None:
                subprocess.run(["ip", "netns", "delete", self._scratch], capture_output=True, check=False)
                self._scratch = None


def _delete_stale_scratch() -> None:
    """Scratch namespaces of node agents that are gone (killed before :meth:`TemplateCache.close`)."""
    try:
        names = os.listdir(NETNS_DIR)
    except OSError:
        return
    for name in names:
        m = _SCRATCH_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)


class NetlinkTableBackend(NftablesBackend):
    """The nftables backend with full applies and read-backs over netlink (module docstring).

    Same table, same artifact, same render as :class:`NftablesBackend`; only the way to the
    kernel differs. ``read_back`` is :func:`~.template.canonical` text, so every baseline this
    backend produces (after a full apply, a delta or a tamper restore) is comparable with it."""

    def __init__(self, table: str = "stockade", netns: str | None = None, *, templates: TemplateCache,
                 **kwargs: Any) -> None:
        super().__init__(table, netns, **kwargs)
        self.templates = templates
        self.last_path = ""  # "netlink" or "nft": how the last full apply reached the kernel
        self._applied_template: TableTemplate | None = None

    def apply(self, artifact: NftablesArtifact) -> None:
        if artifact.table != self.table:
            raise ApplyError(f"artifact is for table {artifact.table!r}, backend owns {self.table!r}")
        self._applied_template = None
        why = netlink_unsupported(artifact)
        if why is None:
            try:
                template = self.templates.template_for(artifact)
                if self._netlink is None:
                    self._netlink = NftNetlink(self.netns)
                self._netlink.send_batch(table_batch(template, artifact), "table batch")
            except BackendError as exc:
                self.close()  # a fresh socket next time: no late answer of this batch is read as another's
                why = f"netlink apply failed ({exc})"
                log.warning("table %s in %s: %s; applying with nft -f", self.table, self.netns, why)
            else:
                self._applied_template = template
                self.last_path = "netlink"
                return
        super().apply(artifact)
        self.last_path = "nft"

    def _dump(self) -> TableDump | None:
        if self._netlink is None:
            self._netlink = NftNetlink(self.netns)
        try:
            return dump_table(self.table, self.netns, self._netlink.sock)
        except BackendError:
            self.close()  # a dump cut short leaves answers on the socket: the next one opens a fresh socket
            raise

    def read_back(self) -> str:
        dump = self._dump()
        return "" if dump is None else "\n".join(canonical(dump)) + "\n"

    def verify(self, expected: NftablesArtifact) -> VerifyReport:
        return self.verify_read_back(expected)[0]

    def verify_read_back(self, expected: NftablesArtifact) -> tuple[VerifyReport, str]:
        """The structural check and the tamper baseline from one netlink dump (no process) when
        the table came from a template; otherwise the nft path's check, then the dump."""
        template = self._applied_template
        if template is None or netlink_unsupported(expected) is not None:
            report = super().verify(expected)
            return report, self.read_back()
        dump = self._dump()
        if dump is None:
            return VerifyReport((f"table inet {self.table} is missing",)), ""
        lines = canonical(dump)
        return VerifyReport(tuple(structure_problems(template, expected, dump, lines))), "\n".join(lines) + "\n"


def structure_problems(template: TableTemplate, expected: NftablesArtifact, dump: TableDump,
                       lines: tuple[str, ...] | None = None) -> list[str]:
    """What differs between the dumped table (``lines``: its :func:`~.template.canonical`, if
    already made) and ``template`` filled with ``expected``'s members."""
    problems: list[str] = []
    have = without_elements(canonical(dump) if lines is None else lines, frozenset(template.peer_sets))
    if have != template.structure:
        extra = sorted(set(have) - set(template.structure))
        missing = sorted(set(template.structure) - set(have))
        problems.append(f"table differs from its template: {len(missing)} line(s) missing, {len(extra)} unexpected"
                        + (f", e.g. {(missing or extra)[0][:120]}" if missing or extra else " (order)"))
    for s in expected.sets:
        try:
            got = set_ranges(dump, s.name)
        except ApplyError as exc:
            problems.append(str(exc))
            continue
        if got is None:
            problems.append(f"set {s.name} is missing")
            continue
        want = AddressRanges.of(s.members)
        if got != want:
            lost, more = want.minus(got), got.minus(want)
            if not lost.is_empty():
                problems.append(f"set {s.name}: missing {_ranges_text(lost)}")
            if not more.is_empty():
                problems.append(f"set {s.name}: unexpected {_ranges_text(more)}")
    return problems
