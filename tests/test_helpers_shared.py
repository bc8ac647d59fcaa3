"""Tests share helpers from one place: helpers.py (and pytest fixtures from conftest.py).

A test module that imports another (test_server's `serve`, say) runs that
module's import side effects, ties the two together, and hides where a helper
lives; so no test module, nor helpers.py or conftest.py, imports a test
module or conftest. And tests do not hang attributes of their own on a
Session (`session.sock = path`): what a Session does not declare, a test
keeps beside it (helpers.socket_path reads the path from its options).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SESSION_SOURCE = TESTS.parent / "buselab" / "session.py"


def is_test_module(name: str) -> bool:
    """A module name that means another test module or conftest (also as tests.test_x or a relative import)."""
    last = name.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def imported_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every import of a test module or conftest in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.module and is_test_module(node.module):
                found.append((node.lineno, node.module))
            elif not node.module or node.level:
                # `from . import test_server`, `from tests import conftest`
                found += [(node.lineno, alias.name) for alias in node.names if is_test_module(alias.name)]
    return sorted(found)


def session_attributes() -> set[str]:
    """What buselab.session.Session declares: attributes set in its methods, methods and properties."""
    tree = ast.parse(SESSION_SOURCE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session")
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            if isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


SESSION_NAMES = ("session", "s", "sess")  # what tests call a Session they hold


def session_attribute_assignments(source: str, declared: set[str]) -> list[tuple[int, str]]:
    """(line, "session.attr") for attributes assigned (or setattr'd) on a session-named variable, undeclared."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.ctx, ast.Store)
                    and isinstance(sub.value, ast.Name)
                    and sub.value.id in SESSION_NAMES
                    and sub.attr not in declared
                ):
                    found.append((sub.lineno, f"{sub.value.id}.{sub.attr}"))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in SESSION_NAMES
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value not in declared
        ):
            found.append((node.lineno, f"{node.args[0].id}.{node.args[1].value}"))
    return sorted(found)


def shared_modules() -> list[Path]:
    """Every test module, and the two shared ones."""
    modules = sorted(TESTS.glob("test_*.py")) + [TESTS / "helpers.py", TESTS / "conftest.py"]
    assert len(modules) > 10 and all(p.exists() for p in modules), modules
    return modules


def test_the_checks_see_what_they_are_for():
    """Both checks flag the cases this file exists to prevent (they did occur), and not their neighbours."""
    # Spelt with {t}, so that grepping the tests for imports of test modules finds none at all.
    t = "test"
    bad = (
        f"from {t}_server import serve, connect\n"
        "import conftest\n"
        "def f():\n"
        f"    from {t}_control import nbdsh\n"
        f"from tests.{t}_server import RawClient\n"
        f"from . import {t}_server\n"
        "import tests.conftest as c\n"
    )
    assert [line for line, _ in imported_test_modules(bad)] == [1, 2, 4, 5, 6, 7]
    good = "from helpers import serve\nimport pytest\nfrom buselab.protocol import constants\nimport testing\n"
    assert imported_test_modules(good) == []

    declared = session_attributes()
    # What Session really declares, and that the parse found it.
    assert {"engine", "options", "steering", "demo_workload", "replayer", "recorder", "start", "stop"} <= declared
    assert "sock" not in declared and "socket" not in declared
    attached = (
        "s.sock = sock  # type: ignore[attr-defined]\n"
        "session.socket = path\n"
        "session.demo_workload = w\n"
        "session.recorder = None\n"
        "setattr(session, 'extra', 1)\n"
        "client.sock = other\n"
    )
    assert session_attribute_assignments(attached, declared) == [
        (1, "s.sock"),
        (2, "session.socket"),
        (5, "session.extra"),
    ]


@pytest.mark.parametrize("path", shared_modules(), ids=lambda p: p.name)
def test_no_module_imports_a_test_module_or_conftest(path):
    found = imported_test_modules(path.read_text())
    assert not found, f"{path.name} imports {found}: move what it needs into helpers.py and import it from there"


@pytest.mark.parametrize("path", shared_modules(), ids=lambda p: p.name)
def test_no_test_attaches_its_own_attributes_to_a_session(path):
    found = session_attribute_assignments(path.read_text(), session_attributes())
    assert not found, f"{path.name} sets attributes Session does not declare: {found} (keep them beside it)"
