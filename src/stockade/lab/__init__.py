"""The kernel lab: real network namespaces, real servers and real probes.

``Lab`` builds throw-away namespaces on a bridge and probes TCP, UDP and ICMP echo
between them, v4 and v6, in parallel. ``stockade.lab.estate`` brings a whole
``Policy`` up in a lab, enforces it with a backend and compares every probe with
the reference evaluator (used by ``stockade lab demo`` and the differential test).
"""

from stockade.lab.lab import DEFAULT_TIMEOUT, HostSpec, Lab
from stockade.lab.netns import LabError, list_namespaces, sweep_stale
from stockade.lab.probes import Outcome, Probe, ProbeKind, ProbeResult, probe_matrix

__all__ = [
    "DEFAULT_TIMEOUT",
    "HostSpec",
    "Lab",
    "LabError",
    "Outcome",
    "Probe",
    "ProbeKind",
    "ProbeResult",
    "list_namespaces",
    "probe_matrix",
    "sweep_stale",
]
