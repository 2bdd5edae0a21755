"""The loader never lets anything but ValidationError escape, whatever bytes it is given."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stockade.errors import ValidationError
from stockade.policyfile import load_sources
from stockade.policyfile.loader import policy_files

ESTATE = Path(__file__).resolve().parents[2] / "examples" / "estate"
EXAMPLE = b"---\n".join(p.read_bytes() for p in policy_files(ESTATE))
# Fragments that are meaningful to YAML or to the policy grammar.
TOKENS = [
    b"-", b":", b"[", b"]", b"{", b"}", b",", b"&a", b"*a", b"!!str", b"!x", b"'", b'"', b"#", b"\n",
    b"  ", b"\t", b"---", b"~", b"yes", b"all", b"ip_list:", b"labels:", b"0/tcp", b"icmp:", b"::",
    b"10.70.0.", b"/33", b"\xff", b"\x00", b"\xc3", b"kind: Ruleset", b"name:", b"%", b"?",
]

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    data = bytearray(EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        if op == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            piece = draw(st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=8)))
            data[at : at + (len(piece) if op == "replace" else 0)] = piece
    return bytes(data)


def _check(data: bytes) -> None:
    try:
        load_sources([("fuzz.yaml", data)])
    except ValidationError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert issue.source == "fuzz.yaml"
            assert issue.line > 0
            assert issue.message


@_SETTINGS
@given(mutated_example())
def test_mutated_example_never_raises_anything_else(data: bytes) -> None:
    _check(data)


@_SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    _check(data)


@_SETTINGS
@given(st.lists(st.sampled_from([*TOKENS, b"a", b" ", b"1", b"\n  "]), max_size=40).map(b"".join))
def test_random_token_soup_never_raises_anything_else(data: bytes) -> None:
    _check(b"apiVersion: stockade.io/v1\n" + data)
