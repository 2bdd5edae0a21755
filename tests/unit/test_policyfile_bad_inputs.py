"""The bad-input suite: every malformed policy in bad_inputs/ yields precise issues, never a traceback.

Each fixture (a file, or a directory loaded as one policy) carries ``# expect:`` comments
giving ``LINE: FIELD: MESSAGE`` for the file that holds the comment; see bad_inputs/README.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from stockade.errors import ValidationError
from stockade.policyfile import load_policy

BAD = Path(__file__).parent / "bad_inputs"
_EXPECT = re.compile(rb"^# expect: (.+)$", re.MULTILINE)


def _fixtures() -> list[Path]:
    return sorted(p for p in BAD.iterdir() if p.suffix == ".yaml" or p.is_dir())


def _expectations(fixture: Path) -> list[str]:
    files = [fixture] if fixture.is_file() else sorted(fixture.rglob("*.yaml"))
    out: list[str] = []
    for file in files:
        for match in _EXPECT.finditer(file.read_bytes()):
            out.append(f"{file}:{match.group(1).decode('ascii')}")
    return out


def test_suite_is_large_enough() -> None:
    assert len(_fixtures()) >= 20
    assert all(_expectations(f) for f in _fixtures()), "every fixture states what it expects"


@pytest.mark.parametrize("fixture", _fixtures(), ids=lambda p: p.name)
def test_bad_input_reports_file_line_and_field(fixture: Path) -> None:
    expected = _expectations(fixture)
    with pytest.raises(ValidationError) as info:
        load_policy(fixture)
    got = [str(issue) for issue in info.value.issues]
    for want in expected:
        assert any(g.startswith(want) for g in got), f"missing {want!r} in {got}"
    assert len(got) == len(expected), f"unexpected extra issues: {got}"
    for issue in info.value.issues:
        assert issue.source and Path(issue.source).exists()
        assert issue.line > 0


def test_three_independent_errors_in_one_file_are_all_reported() -> None:
    with pytest.raises(ValidationError) as info:
        load_policy(BAD / "three_errors.yaml")
    issues = info.value.issues
    assert [(i.line, i.field) for i in issues] == [(7, "ports[0]"), (13, "include[0]"), (19, "mode")]
    assert all(i.source == str(BAD / "three_errors.yaml") for i in issues)


def test_error_text_reads_file_line_field_message() -> None:
    with pytest.raises(ValidationError) as info:
        load_policy(BAD / "unknown_service.yaml")
    source = BAD / "unknown_service.yaml"
    assert str(info.value) == (
        f'{source}:21: rules[1].services[0]: unknown service "htps" (did you mean "https"?)'
    )


def test_directory_fixture_names_the_second_file() -> None:
    with pytest.raises(ValidationError) as info:
        load_policy(BAD / "duplicate_across_files")
    (issue,) = info.value.issues
    assert issue.source.endswith("b.yaml")
    assert f"{BAD / 'duplicate_across_files' / 'a.yaml'}:3" in issue.message


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        load_policy(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("not policy\n")
    with pytest.raises(ValidationError, match=r"no \*\.yaml"):
        load_policy(tmp_path)
