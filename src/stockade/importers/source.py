"""What every importer is given: the files (name + text) and the options of the import."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

from stockade.model.addresses import IPAddress

MAX_SOURCE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Source:
    """One input file: the name shown in the report and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class ImportOptions:
    """``host``: the host name for every file (default: from each file's name, up to its first dot);
    ``addresses``: each host's own addresses (used for its workload and to judge rules naming them);
    ``backend``: the backend setting written into the imported hosts' workloads (None: each agent's own)."""

    host: str | None = None
    addresses: Mapping[str, tuple[IPAddress, ...]] = field(default_factory=dict)
    backend: str | None = None

    def by_host(self, sources: Sequence[Source]) -> list[tuple[str, list[Source]]]:
        """``sources`` grouped per host (``host_of``), hosts in name order, files in given order."""
        grouped: dict[str, list[Source]] = {}
        for s in sources:
            grouped.setdefault(self.host_of(s), []).append(s)
        return sorted(grouped.items())

    def host_of(self, source: Source) -> str:
        from stockade.importers.labels import safe_name

        if self.host:
            return safe_name(self.host, "host")
        stem = PurePath(source.name).name.split(".", 1)[0]
        return safe_name(stem, "host")
