"""The capability matrix is read from the backends' declarations, and docs/backends.md is current."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from stockade.backends.base import Capability
from stockade.backends.capability_matrix import capability_matrix, render_markdown, render_text
from stockade.backends.registry import BACKENDS
from stockade.cli import main

DOC = Path(__file__).resolve().parents[2] / "docs" / "backends.md"


class HalfBackend:
    """A backend that only does IPv4 inbound TCP."""

    name = "half"
    capabilities = frozenset({Capability.IPV4, Capability.INBOUND, Capability.TCP})


def test_matrix_follows_the_declarations() -> None:
    matrix = capability_matrix({**BACKENDS, "half": HalfBackend})
    assert [c.name for c in matrix.columns] == [*BACKENDS, "half"]
    for name, cls in BACKENDS.items():
        for cap in Capability:
            assert matrix.supports(name, cap) == (cap in cls.capabilities)
    assert matrix.supports("half", Capability.TCP)
    assert not matrix.supports("half", Capability.UDP)
    rows = dict(matrix.rows())
    assert rows[Capability.IPV6][-1] is False and rows[Capability.IPV4][-1] is True
    text = render_text(matrix)
    udp_line = next(line for line in text.splitlines() if line.startswith(Capability.UDP.value))
    assert udp_line.split()[-1] == "no"
    assert "| `half` | A backend that only does IPv4 inbound TCP. |" in render_markdown(matrix)


def test_every_capability_and_backend_is_listed() -> None:
    text = render_text(capability_matrix())
    assert text.splitlines()[0].split()[1:] == list(BACKENDS)
    for cap in Capability:
        assert any(line.startswith(cap.value) for line in text.splitlines())


def test_cli_prints_the_matrix() -> None:
    result = CliRunner().invoke(main, ["backends"])
    assert result.exit_code == 0, result.output
    assert result.output == render_text(capability_matrix())
    result = CliRunner().invoke(main, ["backends", "--markdown"])
    assert result.exit_code == 0 and result.output == render_markdown(capability_matrix())


def test_docs_backends_md_is_up_to_date() -> None:
    assert DOC.read_text() == render_markdown(capability_matrix()), (
        "docs/backends.md is out of date: run `stockade backends --markdown > docs/backends.md`"
    )
