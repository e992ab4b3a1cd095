"""The packages import one way, bottom to top (docs/architecture.md has the diagram):

model -> speculative -> engine -> deployments -> server / tune / drafters -> cli

A module may import its own layer and the layers below; packages of one layer may import each
other only without a cycle. Every import counts, lazy and TYPE_CHECKING ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import specserve

LAYERS = {
    "model": 0,
    "speculative": 1,
    "engine": 2,
    "deployments": 3,
    "server": 4,
    "tune": 4,
    "drafters": 4,
    "cli": 5,  # specserve/cli.py
    "__main__": 6,
}
PACKAGE_ROOT = Path(specserve.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> Iterator[str]:
    """Every specserve module ``path`` imports (absolute or relative, at any depth)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield ".".join([*base, *([node.module] if node.module else [])])
            elif node.module:
                yield node.module


def package_of(module: str) -> str | None:
    """The layer package of a specserve module (``specserve.engine.scheduler`` -> engine)."""
    parts = module.split(".")
    if parts[0] != "specserve" or len(parts) < 2:
        return None
    return parts[1]


def package_edges() -> dict[tuple[str, str], str]:
    """(importer package, imported package) -> one example, e.g. "engine.x -> model.y"."""
    edges: dict[tuple[str, str], str] = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = _module_name(path)
        for target in _imported(path):
            a, b = package_of(source), package_of(target)
            if a is not None and b is not None and a != b:
                edges.setdefault((a, b), f"{source} -> {target}")
    return edges


def violations(edges: dict[tuple[str, str], str], layers: dict[str, int]) -> list[str]:
    """Upward imports, imports of packages with no layer, and cycles among packages."""
    found = []
    for (a, b), example in sorted(edges.items()):
        if a not in layers or b not in layers:
            found.append(f"package without a layer: {example}")
        elif layers[a] < layers[b]:
            found.append(f"upward import: {example}")
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    found += [f"package cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each package that lies on one (depth-first search)."""
    cycles, done = [], set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycles.append([*path, start])
                elif nxt not in path and nxt not in done:
                    stack.append((nxt, [*path, nxt]))
        done.add(start)
    return cycles


def test_packages_import_one_way_without_cycles() -> None:
    edges = package_edges()
    assert ("engine", "speculative") in edges  # the parser sees imports at all
    assert violations(edges, LAYERS) == []


def test_every_layer_package_says_what_it_may_import() -> None:
    for name in LAYERS:
        init = PACKAGE_ROOT / name / "__init__.py"
        if init.is_file():
            doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
            assert "May import" in doc, f"{init}: the docstring must say what it may import"


def test_the_check_fails_on_an_upward_import_and_on_a_cycle() -> None:
    """Negative controls: the rule is not vacuous."""
    upward = {("model", "engine"): "model.a -> engine.b"}
    assert violations(upward, LAYERS) == ["upward import: model.a -> engine.b"]
    same_layer = {("server", "tune"): "s -> t", ("tune", "server"): "t -> s"}
    assert any(v.startswith("package cycle") for v in violations(same_layer, LAYERS))
    assert violations({("model", "extra"): "m -> x"}, LAYERS) == ["package without a layer: m -> x"]
