"""The shape of the code: imports point one way, and no part reaches past its layer.

import-linter (`lint-imports`, run by scripts/test) holds the layer order and keeps
Textual in the lab; these tests hold what a layer contract cannot say.
"""

from __future__ import annotations

import grimp
import pytest


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("buselab", cache_dir=None)


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), counting every import statement."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(module: str) -> None:
        nonlocal counter
        index[module] = low[module] = counter
        counter += 1
        stack.append(module)
        on_stack.add(module)
        for target in graph.find_modules_directly_imported_by(module):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle_anywhere(graph):
    # grimp sees imports inside functions and under TYPE_CHECKING as well.
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    g = grimp.ImportGraph()
    for name in ("a", "a.b", "a.c", "a.d"):
        g.add_module(name)
    g.add_import(importer="a.b", imported="a.c")
    g.add_import(importer="a.c", imported="a.b")
    g.add_import(importer="a.c", imported="a.d")
    assert cycles(g) == [["a.b", "a.c"]]


def test_the_engine_knows_storage_only_through_its_interface(graph):
    """The engine runs requests on a Stack of Backends: it names no concrete backend or filter."""
    allowed = {"buselab.storage.base", "buselab.storage.stack"}
    engine = {m for m in graph.modules if m == "buselab.engine" or m.startswith("buselab.engine.")}
    reached = {
        imported
        for module in engine
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.startswith("buselab.storage")
    }
    assert reached <= allowed, reached - allowed


def test_nothing_below_the_front_ends_imports_the_session(graph):
    front_ends = (
        "buselab.cli",
        "buselab.commands",
        "buselab.ui",
        "buselab.headless",
        "buselab.workload",
        "buselab.captive",
        "buselab.lessons",
    )
    importers = graph.find_modules_that_directly_import("buselab.session")
    assert {m for m in importers if not m.startswith(front_ends)} == set()


def test_steering_is_made_by_the_session_not_found_through_the_engine():
    from buselab.engine import Engine
    from buselab.session import ServeOptions, Session
    from buselab.storage.backends.ram import RamBackend

    session = Session(RamBackend(1 << 20), ServeOptions())
    assert session.steering.engine is session.engine
    assert not hasattr(session.engine, "steering") and not hasattr(Engine, "steering")
