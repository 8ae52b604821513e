"""The package's architecture, read from its imports: no import circle among cascade_core's modules, and
no module importing a sub-package above its own (the order is cascade_core's docstring's)."""
from __future__ import annotations

import ast
import pathlib

import cascade_core

CORE = pathlib.Path(cascade_core.__file__).parent
# lowest first; a sub-package may import only those before it (the docstring of cascade_core states it)
LAYERS = [("common",), ("model",), ("weights",), ("sampling",), ("video",), ("distributed",), ("session",),
          ("cli", "client")]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """{module: the cascade_core modules it imports at run time} (imports under TYPE_CHECKING left out;
    an import of a package's name counts as one of the package's __init__)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def _sub_package(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVEL else None


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with colours)."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (found := visit(node)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from one sub-package into another at the same or a higher layer."""
    bad = []
    for mod, targets in graph.items():
        here = _sub_package(mod)
        for target in targets:
            there = _sub_package(target)
            if here and there and here != there and LEVEL[there] >= LEVEL[here]:
                bad.append(f"{mod} imports {target}")
            if here and there is None and target != "cascade_core":
                bad.append(f"{mod} imports the top-level module {target}")
    return sorted(bad)


def test_no_import_circle():
    assert find_circle(import_graph()) is None


def test_no_upward_import_between_sub_packages():
    assert upward_imports(import_graph()) == []


def test_every_module_sits_in_a_sub_package():
    top = {m for m in _modules() if m.count(".") == 1 and _sub_package(m) is None}
    assert top == {"cascade_core.__main__", "cascade_core.bench"}, "modules at the top level"


def test_the_checks_find_what_they_look_for():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"cascade_core.model.dit": {"cascade_core.sampling.plan"}}) == [
        "cascade_core.model.dit imports cascade_core.sampling.plan"]
    assert upward_imports({"cascade_core.cli.run": {"cascade_core.client.http"}})
    assert upward_imports({"cascade_core.sampling.loop": {"cascade_core.model.dit"}}) == []


def test_the_docstring_states_the_order():
    doc = cascade_core.__doc__
    positions = [doc.index(f"{names[0]}/") for names in LAYERS]
    assert positions == sorted(positions)


def test_test_modules_have_unique_names_across_folders():
    """conftest puts every test folder on sys.path; two test modules of one name would shadow each other."""
    tests = pathlib.Path(__file__).parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted(names) == sorted(set(names))
