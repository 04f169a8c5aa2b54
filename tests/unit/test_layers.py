"""The import graph of the repository's own code: layers import only downward, and no module
reaches another through a circle.

    scripts (thin commands)  →  apps (experiments/<app>.py)  →  pipelines (experiments/pipelines,
    experiments/config)  →  core (experiments/core)  →  the library (multimax)

Every import counts, function-local ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from experiments.core.io import REPO_ROOT

PACKAGES = ("multimax", "experiments", "scripts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    """0 library, 1 core, 2 pipelines and config, 3 apps, 4 scripts."""
    parts = module.split(".")
    if parts[0] == "multimax":
        return 0
    if parts[0] == "scripts":
        return 4
    if len(parts) == 1:  # the experiments package itself
        return 1
    if parts[1] == "core":
        return 1
    if parts[1] in ("pipelines", "config"):
        return 2
    return 3  # experiments/<app>.py


def our_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Our modules that ``module`` imports anywhere in its file (``from a.b import c`` counts
    as ``a.b.c`` when that is a module of ours, else as ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] in PACKAGES and target != module:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = our_modules()
    return {m: imports_of(p, m, set(modules)) for m, p in modules.items()}


def test_every_import_goes_down_the_layers(graph):
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in graph.items()
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert upward == []


def test_no_import_circle(graph):
    """Tarjan's strongly connected components: every one must be a single module (package
    ``__init__`` files that only document their package are not edges)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_check_sees_a_circle_and_an_upward_import(tmp_path):
    """The walk itself: a two-module circle and a core → pipeline import are found."""
    a = tmp_path / "a.py"
    a.write_text("from experiments.pipelines.demo import main\nimport multimax\n")
    known = {"experiments.pipelines.demo", "multimax", "experiments.core.a"}
    found = imports_of(a, "experiments.core.a", known)
    assert found == {"experiments.pipelines.demo", "multimax"}
    assert layer("experiments.pipelines.demo") > layer("experiments.core.a")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from multimax import attention\n")
    assert imports_of(b, "multimax.losses", {"multimax", "multimax.attention"}) == {
        "multimax.attention"
    }


def test_library_never_imports_the_experiment_side(graph):
    leaks = [
        f"{m} imports {t}"
        for m, ts in graph.items()
        if m.startswith("multimax")
        for t in ts
        if not t.startswith("multimax")
    ]
    assert leaks == []
