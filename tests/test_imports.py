"""The package's import graph: no cycles, and the engine configuration stays independent of the model code.

The graph is read from the source with `ast`, so imports deferred into functions count too: deferring an import
hides a cycle at start-up but leaves the modules tangled.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "tokenmill"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module itself, or the nearest enclosing one (`import a.b.c` of a non-module `c` means `a.b`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _base(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    if not node.level:
        return node.module
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `module` imports anywhere in its source. The parent packages that Python imports
    on the way are left out: every module would otherwise depend on `tokenmill/__init__.py`."""
    targets: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, node, is_package)
            if base is None:
                continue
            # `from pkg import name` imports the submodule pkg.name if there is one, else takes name from pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules) if name == PACKAGE or name.startswith(PACKAGE + ".") else None
            if target is not None and target != module:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in done:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_graph_is_read_from_the_whole_package() -> None:
    graph = import_graph()
    assert f"{PACKAGE}.config" in graph
    # Deferred imports inside functions are part of the graph.
    assert any(len(targets) > 1 for targets in graph.values())


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}, ["b", "b2", "b"]),
])
def test_find_cycle(graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected


def test_relative_and_submodule_imports_resolve(tmp_path: Path) -> None:
    source = "from . import sibling\nfrom .sub import thing\nfrom tokenmill.sub import leaf, name\nimport os\n"
    modules = {m: tmp_path / "x.py" for m in ("tokenmill.pkg.mod", "tokenmill.pkg.sibling", "tokenmill.pkg.sub",
                                              "tokenmill.sub", "tokenmill.sub.leaf")}
    path = tmp_path / "mod.py"
    path.write_text(source)
    assert imports_of("tokenmill.pkg.mod", path, modules) == {
        "tokenmill.pkg.sibling", "tokenmill.pkg.sub", "tokenmill.sub", "tokenmill.sub.leaf"}


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_config_does_not_import_the_model() -> None:
    """The engine configuration is read by the CLI and the server before any model code is needed."""
    modules = package_modules()
    config = f"{PACKAGE}.config"
    model = f"{PACKAGE}.model"
    offending = sorted(t for t in imports_of(config, modules[config], modules)
                       if t == model or t.startswith(model + "."))
    assert not offending, f"{config} imports {offending}"
