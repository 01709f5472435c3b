"""The layout's import rules (docs/architecture.md), checked on the source text of every module.

    sources → store → engine → dataplane → observers, with control beside them

- the engine imports nothing of the project;
- the store imports no source (it is handed a compiler), and nothing of the data or control plane;
- the data plane knows no source, observer or control-plane module; observers no source or control;
- experiments (recording, backends, statistics) know no source, data plane, observer or control plane;
- the control plane knows no vendor source: only the source contract, and native's ``document``
  module (the admin API writes the native format);
- only the composition roots (``proxy.app``, ``proxy.server``, ``proxy.cli``) import everything;
- no import cycles among module-level imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
ROOTS = ("proxy.app", "proxy.server", "proxy.cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(every ``proxy.*`` module imported anywhere, those imported at module level at run time)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    everywhere: set[str] = set()
    top_level: set[str] = set()

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from proxy.control import audit`` imports the module proxy.control.audit
            return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        return []

    def visit(node: ast.AST, runtime_top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            found = [n for n in names(child) if n == "proxy" or n.startswith("proxy.")]
            everywhere.update(found)
            if runtime_top:
                top_level.update(found)
            if (isinstance(child, ast.If) and is_type_checking(child)) or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            ):
                visit(child, False)
            else:
                visit(child, runtime_top)

    visit(tree, True)
    return everywhere, top_level


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
EXISTING = set(MODULES)


def real(targets: set[str]) -> set[str]:
    """Imported names that are modules of the project (``from x import name`` adds non-modules)."""
    return {t for t in targets if t in EXISTING}


GRAPH = {name: tuple(real(t) for t in imports(path)) for name, path in MODULES.items()}


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_layout_has_the_packages_of_the_flow() -> None:
    for package in ("engine", "sources", "store", "dataplane", "observers", "control", "cli"):
        assert (PACKAGE / package / "__init__.py").is_file(), package


@pytest.mark.parametrize(
    ("layer", "forbidden", "allowed"),
    [
        ("proxy.engine", ("proxy",), ("proxy.engine",)),
        (
            "proxy.store",
            ("proxy.sources", "proxy.dataplane", "proxy.control", "proxy.observers", *ROOTS),
            (),
        ),
        ("proxy.dataplane", ("proxy.sources", "proxy.control", "proxy.observers", *ROOTS), ()),
        ("proxy.observers", ("proxy.sources", "proxy.control", *ROOTS), ()),
        (
            "proxy.control",
            ("proxy.sources", "proxy.observers", *ROOTS),
            ("proxy.sources.base", "proxy.sources.native.document"),  # the contract; the admin API's format
        ),
        ("proxy.sources", ("proxy.dataplane", "proxy.observers", "proxy.control.app", *ROOTS), ()),
        (
            "proxy.experiments",
            ("proxy.sources", "proxy.dataplane", "proxy.control", "proxy.observers", *ROOTS),
            (),
        ),
        ("proxy.origin", ("proxy",), ("proxy.origin",)),  # copied into origin apps: stdlib only
    ],
)
def test_import_directions(layer: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    breaches = sorted(
        f"{name} imports {target}"
        for name, (everywhere, _) in GRAPH.items()
        if under(name, layer)
        for target in everywhere
        if under(target, *forbidden) and not under(target, layer, *allowed)
    )
    assert breaches == []


def test_only_the_composition_roots_import_every_layer() -> None:
    layers = ("proxy.sources", "proxy.store", "proxy.dataplane", "proxy.observers", "proxy.control")
    everything = [
        name
        for name, (everywhere, _) in GRAPH.items()
        if all(any(under(t, layer) for t in everywhere) for layer in layers)
    ]
    assert everything and all(under(name, *ROOTS) for name in everything), everything


def test_no_import_cycles() -> None:
    edges = {name: {t for t in top if t != name} for name, (_, top) in GRAPH.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if target not in edges:
                continue
            # importing a submodule runs its package's __init__ first; an edge into one's own
            # package __init__ is how Python imports a submodule, not a cycle
            if node.startswith(target + "."):
                continue
            if state.get(target) == 1:
                cycles.append([*path, node, target])
            elif target not in state:
                walk(target, [*path, node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            walk(name, [])
    assert cycles == []


def test_the_check_can_fail() -> None:
    """The scanner sees imports at module level, in functions and under TYPE_CHECKING."""
    sample = PACKAGE / "engine" / "flag.py"
    everywhere, top = imports(sample)
    assert everywhere == top == set()
    control_everywhere, control_top = imports(PACKAGE / "control" / "app.py")
    assert "proxy.control.deps" in control_top and control_top <= control_everywhere
