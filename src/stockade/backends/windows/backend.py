"""The Windows Firewall backend: NetSecurity PowerShell scripts run by a thin runner.

``render`` is pure (:mod:`stockade.backends.windows.render`); ``apply`` writes the script to a
temporary ``.ps1`` (UTF-8 with BOM, which Windows PowerShell 5.1 needs for non-ASCII text)
and runs ``powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File <file>``
as an argv list, never a shell. The process executor is injectable, so the runner is
unit-tested here without Windows.

``apply_delta`` (dynamic keyword mode) recomputes the addresses behind every keyword from the
last applied host policy with the deltas folded in, and updates only the keywords that
changed (``Update-NetFirewallDynamicKeywordAddress``): rules are never touched. In
address-list mode a delta re-renders and re-applies the whole policy (still atomic).
``remove`` deletes the ``Stockade`` rule group and the ``stockade-`` keywords, nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile

from stockade.backends.base import WITHOUT_ENCRYPTION, Capability, check_capabilities
from stockade.backends.common import CommandResult, Executor, executor_with_timeout
from stockade.backends.setalgebra import policy_after_deltas
from stockade.backends.windows.model import (
    BACKEND_NAME,
    OtherProtocols,
    PeerMode,
    WindowsArtifact,
)
from stockade.backends.windows.render import rekeyword, render_windows
from stockade.backends.windows.script import apply_script, delta_script, read_back_script, remove_script
from stockade.compiler.ir import HostPolicy, SetDelta
from stockade.errors import ApplyError

# SCTP: NetSecurity port filters take TCP/UDP only; an SCTP rule would lose its ports
WINDOWS_CAPABILITIES = WITHOUT_ENCRYPTION - {Capability.SCTP}
POWERSHELL_TIMEOUT_S = 600.0


subprocess_executor = executor_with_timeout(POWERSHELL_TIMEOUT_S)


class PowerShellRunner:
    """Runs a script text through ``powershell.exe -File`` with an injectable executor."""

    def __init__(self, executor: Executor = subprocess_executor, powershell: str = "powershell.exe") -> None:
        self.executor = executor
        self.powershell = powershell

    def argv(self, path: str) -> list[str]:
        return [self.powershell, "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File", path]

    def run(self, script: str) -> CommandResult:
        fd, path = tempfile.mkstemp(prefix="stockade-", suffix=".ps1")
        try:
            with os.fdopen(fd, "w", encoding="utf-8-sig", newline="\r\n") as f:
                f.write(script)
            result = self.executor(self.argv(path))
        finally:
            os.unlink(path)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()
            raise ApplyError(f"PowerShell failed (exit {result.returncode}): {detail[:2000]}")
        return result


class WindowsFirewallBackend:
    """Windows Firewall enforcement through the NetSecurity PowerShell module."""

    name = BACKEND_NAME
    capabilities: frozenset[Capability] = WINDOWS_CAPABILITIES

    def __init__(
        self,
        peer_mode: PeerMode = PeerMode.DYNAMIC_KEYWORDS,
        other_protocols: OtherProtocols = OtherProtocols.EXPAND,
        *,
        executor: Executor = subprocess_executor,
        powershell: str = "powershell.exe",
    ) -> None:
        self.peer_mode = peer_mode
        self.other_protocols = other_protocols
        self.runner = PowerShellRunner(executor, powershell)
        self._applied: WindowsArtifact | None = None

    # ---- pure ------------------------------------------------------------------------
    def render(self, host_policy: HostPolicy) -> WindowsArtifact:
        check_capabilities(self.name, self.capabilities, host_policy)
        return render_windows(host_policy, self.peer_mode, self.other_protocols)

    # ---- host ------------------------------------------------------------------------
    def apply(self, artifact: WindowsArtifact) -> None:
        """Install ``artifact`` (all or nothing: a failure leaves the previous policy)."""
        self.runner.run(artifact.to_text())
        self._applied = artifact if artifact.plan.present else None

    def apply_delta(self, deltas: tuple[SetDelta, ...]) -> None:
        artifact = self._applied
        new_hp = policy_after_deltas(self.name, self.capabilities, artifact.host_policy if artifact else None, deltas)
        if new_hp is None or artifact is None:
            return
        if artifact.plan.peer_mode is PeerMode.ADDRESS_LISTS:
            new = render_windows(new_hp, artifact.plan.peer_mode, self.other_protocols)
            self.runner.run(new.to_text())
            self._applied = new
            return
        new_plan = rekeyword(artifact.plan, new_hp)
        changed = [k for k, old in zip(new_plan.keywords, artifact.plan.keywords, strict=True) if k != old]
        if changed:
            self.runner.run(delta_script(changed))
        self._applied = WindowsArtifact(new_plan, apply_script(new_plan), new_hp)

    def read_back(self) -> str:
        """Stockade's rules, keywords and profile defaults, as sorted JSON ("" when none)."""
        out = self.runner.run(read_back_script()).stdout.strip()
        if not out:
            return ""
        try:
            doc = json.loads(out)
        except json.JSONDecodeError as exc:
            raise ApplyError(f"unreadable read-back output: {exc}") from exc
        if not doc.get("rules") and not doc.get("keywords"):
            return ""
        for rule in doc.get("rules") or []:
            rule.pop("Name", None)  # generation-specific
        for kw in doc.get("keywords") or []:
            kw.pop("Id", None)
            kw["Keyword"] = kw.get("Keyword", "").split("-", 2)[-1]
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"

    def remove(self) -> None:
        self.runner.run(remove_script())
        self._applied = None
