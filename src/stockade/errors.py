"""The one exception tree of Stockade.

::

    StockadeError
     ├── ValidationError          bad input (policy files, API bodies); carries Issues
     ├── CompileError             the compiler cannot build a HostPolicy
     ├── UnsupportedFeatureError  a backend lacks a capability a rule needs (fail closed)
     ├── BackendError
     │    ├── RenderError         a renderer cannot express the policy
     │    └── ApplyError          the kernel/device refused; previous ruleset stays in force
     ├── ProofError               verification could not prove kernel == policy
     │    └── UnmodelledConstructError  the read-back holds something the prover does not model
     ├── NotFoundError
     ├── ConflictError            stale revision / duplicate name
     └── AuthError                authentication or authorisation failed

HTTP status codes are assigned only at the API edge.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Issue:
    """One problem found in the input: where it is and what is wrong."""

    source: str  # file name, or "api", or "" when unknown
    line: int  # 1-based; 0 when unknown
    field: str  # dotted path, e.g. "rules[2].services[0]"
    message: str

    def __str__(self) -> str:
        where = self.source or "<input>"
        if self.line:
            where = f"{where}:{self.line}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class StockadeError(Exception):
    """Base of every error Stockade raises on purpose."""


class ValidationError(StockadeError):
    """Input is invalid. ``issues`` lists every problem found, not only the first."""

    def __init__(self, issues: list[Issue] | tuple[Issue, ...]) -> None:
        self.issues: tuple[Issue, ...] = tuple(sorted(issues))
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid input")


class CompileError(StockadeError):
    """The compiler cannot build a host policy."""


class UnsupportedFeatureError(StockadeError):
    """A backend was asked for a feature it does not declare; nothing is applied."""

    def __init__(self, backend: str, feature: str, rule_id: str) -> None:
        self.backend = backend
        self.feature = feature
        self.rule_id = rule_id
        super().__init__(
            f"backend {backend!r} does not support {feature} (needed by rule {rule_id!r})"
        )


class BackendError(StockadeError):
    """A backend failed."""


class RenderError(BackendError):
    """A renderer cannot express the given host policy."""


class ApplyError(BackendError):
    """Applying an artifact failed; the previous ruleset is still in force."""


class ProofError(StockadeError):
    """A proof could not be carried out (read-back failed, or it holds what is not modelled).

    A proof that ran and found a difference is not an error: it returns a counterexample."""


class UnmodelledConstructError(ProofError):
    """The loaded ruleset holds a construct the prover does not model: the proof fails closed."""

    def __init__(self, where: str, construct: str) -> None:
        self.where = where
        self.construct = construct
        super().__init__(f"{where}: unmodelled construct {construct}")


class NotFoundError(StockadeError):
    """A named object does not exist."""


class ConflictError(StockadeError):
    """An edit conflicts with the stored state (stale revision, duplicate name)."""


class AuthError(StockadeError):
    """Authentication or authorisation failed."""
