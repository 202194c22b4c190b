"""The package's import graph: no cycles, and every layer imports only the layers below it.

Every ``import`` of every module counts, top-level and function-local alike: a function-local import
delays a dependency, it does not remove it. The layers (docs/architecture.md, "Packages"):

    constants, integrity, atomic, ftddm_trt   utilities: import nothing of the package
    data, models                              utilities only
    diffusion                                 + data
    export                                    + models, diffusion
    engine                                    + export
    serving                                   + engine
    bench                                     + serving
    training                                  + bench (scores its candidates as the benchmarks do), not serving
    workflows                                 everything but cli (the application logic of the commands)
    cli                                       everything; nothing imports cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ftddm_trt

PACKAGE_DIR = Path(ftddm_trt.__file__).parent
UTILITIES = frozenset({"ftddm_trt", "constants", "integrity", "atomic"})
_BASE = UTILITIES | {"data", "models", "diffusion"}

#: layer -> the other layers its modules may import
ALLOWED: dict[str, frozenset[str]] = {
    **{name: UTILITIES for name in UTILITIES},
    "data": UTILITIES,
    "models": UTILITIES,
    "diffusion": UTILITIES | {"data"},
    "export": _BASE,
    "engine": _BASE | {"export"},
    "serving": _BASE | {"export", "engine"},
    "bench": _BASE | {"export", "engine", "serving"},
    "training": _BASE | {"export", "engine", "bench"},
    "workflows": _BASE | {"export", "engine", "serving", "bench", "training"},
    "cli": _BASE | {"export", "engine", "serving", "bench", "training", "workflows"},
}

#: (importing module, imported module) pairs that break a rule above, each with its reason. Empty: keep it so.
ALLOWED_EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (a package's ``__init__.py``
    under the package's name)."""
    root = package_dir.parent
    mods = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names one import statement of ``module`` can bind: ``from a import b`` gives ``a`` and ``a.b``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file. ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg``; a module's own parent packages are left out (Python
    runs them first anyway)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported_names(module, path, node)
            targets = [n for n in names[1:] if n in mods] if isinstance(node, ast.ImportFrom) else []
            if not targets:
                targets = [n for n in names if n in mods][:1]
            for target in targets:
                if target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> str:
    """``ftddm_trt.engine.pipeline`` -> ``engine``; ``ftddm_trt.constants`` -> ``constants``; the package
    itself -> ``ftddm_trt``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b (layer A -> layer B)`` for every import that ``ALLOWED`` forbids and no exception allows."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            src, dst = layer(module), layer(target)
            if src != dst and dst not in ALLOWED[src] and (module, target) not in ALLOWED_EXCEPTIONS:
                bad.append(f"{module} -> {target} ({src} -> {dst})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_every_layer_has_rules(graph):
    assert {layer(m) for m in graph} <= set(ALLOWED)


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_layers_import_only_the_layers_below(graph):
    assert layer_violations(graph) == []


def test_nothing_outside_cli_imports_cli(graph):
    assert [f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer(t) == "cli" and layer(m) != "cli"] == []


def test_allowed_exceptions_are_still_needed(graph):
    assert [pair for pair in ALLOWED_EXCEPTIONS if pair[1] not in graph.get(pair[0], ())] == []


def test_function_local_and_relative_imports_count(tmp_path):
    pkg = tmp_path / "ftddm_trt"
    (pkg / "data").mkdir(parents=True)
    (pkg / "training").mkdir()
    for init in (pkg, pkg / "data", pkg / "training"):
        (init / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ftddm_trt.training import b\n")
    (pkg / "training" / "b.py").write_text("from ..data import a\n")
    g = import_graph(module_files(pkg))
    assert g["ftddm_trt.data.a"] == {"ftddm_trt.training.b"}
    assert g["ftddm_trt.training.b"] == {"ftddm_trt.data.a"}
    assert cycles(g) == [["ftddm_trt.data.a", "ftddm_trt.training.b"]]
    assert layer_violations(g) == ["ftddm_trt.data.a -> ftddm_trt.training.b (data -> training)"]
