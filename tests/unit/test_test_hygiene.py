"""Tests that run a coroutine do it in a thread of their own (tests/asyncutil.py), every one of them.

The browser layer's session-scoped sync Playwright leaves an event loop running in its xdist
worker's main thread, so a plain ``asyncio.run`` in a test that lands on that worker fails with
"cannot be called from a running event loop", and only in the full suite's order (session 10: four
tests passed alone and failed in CI). The class, not the case: no test module outside tests/browser
calls ``asyncio.run``, ``run_until_complete`` or ``new_event_loop`` except inside a lambda (a
thread's target, as tests/k8s/kube.py does) or through ``tests.asyncutil.run_async``.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
LOOP_CALLS = {"run", "run_until_complete", "new_event_loop"}


def _loop_calls_outside_lambdas(tree: ast.AST) -> list[int]:
    found: list[int] = []

    def visit(node: ast.AST, in_lambda: bool) -> None:
        if isinstance(node, ast.Call) and not in_lambda:
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in LOOP_CALLS and (
                    f.attr != "run" or (isinstance(f.value, ast.Name) and f.value.id == "asyncio")):
                found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, in_lambda or isinstance(node, ast.Lambda))

    visit(tree, False)
    return found


def test_no_test_runs_an_event_loop_in_the_workers_main_thread() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS)
        if rel.parts[0] == "browser" or rel.as_posix() == "asyncutil.py":
            continue
        for line in _loop_calls_outside_lambdas(ast.parse(path.read_text(), str(path))):
            offenders.append(f"tests/{rel}:{line}")
    assert not offenders, f"use tests.asyncutil.run_async (or a thread of its own): {offenders}"


def test_the_check_sees_a_plain_asyncio_run() -> None:
    bad = ast.parse("import asyncio\nasyncio.run(main())\nloop.run_until_complete(x)\n")
    ok = ast.parse("import threading\nthreading.Thread(target=lambda: asyncio.run(main()))\nsubprocess.run([])\n")
    assert _loop_calls_outside_lambdas(bad) == [2, 3]
    assert _loop_calls_outside_lambdas(ok) == []
